"""Evaluation (`infer.py eval`, v4jax.evaluation): the NIAH generator and scorer on their own (an
oracle that reads the needle scores 100 %, a guesser ~0 %, the grid is its seed's), the engine's
log-probabilities against the full forward, perplexity's bookkeeping, the indexer's top-k picks
against the forward's own, and the command end to end. One model, one engine shape (few compiles)."""
import dataclasses
import json
import os
import re
import sys

import jax
import numpy as np
import pytest

import v4jax
from conftest import fixture_dir
from v4jax.data import ByteTokenizer
from v4jax.evaluation import likelihood, niah, perplexity, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import infer  # noqa: E402

CTX = 512
TOL = 1e-4
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def m():
    model = v4jax.load(fixture_dir("tiny-a-fp8"), max_context=CTX)
    return model


def _grid(seed=0, **kw):
    args = dict(tasks=niah.TASKS, lengths=(700, 900), depths=(0.0, 0.5, 1.0), samples=2, seed=seed)
    args.update(kw)
    return niah.build_grid(TOK, 0, **args)


def _oracle(s: niah.Sample) -> str:
    """Reads the prompt: the value(s) of the asked key, as a perfect retriever would answer."""
    text = TOK.decode(s.ids)
    vals = re.findall(rf"The special magic number for {re.escape(s.key)} is (\d+)\.", text)
    return " " + ", ".join(vals if s.task == "niah_multivalue" else vals[:1]) + "."


# ------------------------------------------------------------------ generator and scorer (no model)
def test_prompts_have_the_exact_length_and_the_needles_where_the_spans_say():
    g = _grid()
    assert len(g) == 4 * 2 * 3 * 2
    for s in g:
        assert len(s.ids) == s.length and s.ids[0] == 0
        for (a, b), v in zip(s.spans, s.values):
            assert TOK.decode(s.ids[a:b]) == " " + v
    # the queried needle moves through the haystack with the depth
    starts = {d: np.mean([s.spans[0][0] / s.length for s in g if s.task == "niah_single_essay" and s.depth == d])
              for d in (0.0, 0.5, 1.0)}
    assert starts[0.0] < 0.3 < starts[0.5] < 0.7 < starts[1.0]


def test_the_grid_is_its_seeds():
    a, b, c = _grid(seed=7), _grid(seed=7), _grid(seed=8)
    assert [s.ids for s in a] == [s.ids for s in b]
    assert [s.values for s in a] != [s.values for s in c]


def test_an_oracle_scores_everything_and_a_guesser_nothing():
    g = _grid()
    assert all(niah.score(s, _oracle(s)) == 1.0 for s in g)
    rng = np.random.default_rng(0)
    guesses = [niah.score(s, f" {rng.integers(1_000_000, 10_000_000)}.") for s in g]
    assert np.mean(guesses) == 0.0
    summary = niah.summarise(g, [niah.score(s, _oracle(s)) for s in g])
    assert all(cell["mean"] == 1.0 and cell["lengths"] == [700, 900] for cell in summary.values())


def test_multikey_distractors_and_multivalue_partial_credit():
    g = _grid(tasks=("niah_multikey", "niah_multivalue"), lengths=(700,), depths=(0.5,), samples=1)
    mk, mv = g
    text = TOK.decode(mk.ids)
    others = [v for k, v in re.findall(r"number for ([a-z]+-[a-z]+) is (\d+)\.", text) if k != mk.key]
    assert len(others) == niah.N_NEEDLES - 1
    assert niah.score(mk, f" {others[0]}.") == 0.0  # a distractor's value is wrong
    assert niah.score(mk, f" {mk.values[0]}, {others[0]}") == 1.0  # the first number counts
    assert len(mv.values) == niah.N_NEEDLES
    assert niah.score(mv, " " + ", ".join(mv.values[:2])) == 0.5
    assert niah.score(mv, " 1, " + ", ".join(mv.values)) == 0.75  # only the first four numbers count


def test_too_short_a_length_and_an_unknown_task_are_refused():
    with pytest.raises(ValueError, match="context length 100 is shorter than the"):
        _grid(lengths=(100,))
    with pytest.raises(ValueError, match="unknown NIAH task 'niah_x'"):
        _grid(tasks=("niah_x",))


def test_needle_recall_counts_the_entries_covering_the_value():
    s = niah.Sample("niah_single_repeat", 400, 0.5, [0] * 400, "k", ["1234567"], [(101, 109)], 12)
    covering = [25, 26, 27]  # tokens 101..108 with 4 tokens per entry
    assert niah.needle_recall(s, [np.array(covering + [-1]), np.array([25, 3, 4])], [1, 3]) == {1: 1.0, 3: 1 / 3}


# ------------------------------------------------------------------ through the model
def test_engine_logprobs_equal_the_full_forward(m):
    eng = m.engine(2)
    eng.prefill_chunk = 64  # several chunks per row: the state carries across them
    try:
        rows = [np.asarray(_grid()[0].ids[:300]), np.asarray(_grid()[1].ids[:150])]
        got = likelihood.score_rows(eng, rows)
    finally:
        eng.prefill_chunk = 2048
    for r, g in zip(rows, got):
        lg = m.score(r[None])[0]
        want = np.asarray(jax.nn.log_softmax(lg, -1))[np.arange(r.size - 1), r[1:]]
        assert g["logp"].shape == (r.size - 1,)
        assert np.abs(g["logp"] - want).max() <= TOL
        assert (g["greedy"] == (np.asarray(lg).argmax(-1)[:-1] == r[1:])).all()


def test_windows_predict_every_token_once():
    toks = np.arange(1, 1201)
    w = likelihood.windows(toks, 512)
    assert [o for o, _ in w] == [0, 512, 1024]
    targets = np.concatenate([x[1:] for _, x in w])
    assert (targets == toks[1:]).all()
    assert max(x.size for _, x in w) == 513


def test_perplexity_is_the_mean_of_the_window_logprobs(m):
    docs = ["def f(x):\n    return x + 1\n" * 30, "", "short one"]  # 810 bytes: two windows
    totals = []
    res = perplexity.evaluate(m.engine(2), TOK, docs, progress=lambda n: totals.append(n) or (lambda k: None))
    seqs = [w for d in docs if d for _, w in likelihood.windows(perplexity.doc_tokens(TOK, d, 0), CTX)]
    direct = likelihood.score_many(m.engine(2), seqs)
    nll = -np.concatenate([r["logp"] for r in direct])
    assert res["documents"] == 2 and res["windows"] == 3 and res["tokens"] == nll.size == totals[0]
    assert res["bytes"] == sum(len(d.encode()) for d in docs)
    assert res["nll"] == pytest.approx(nll.mean(), rel=1e-9)
    assert res["bits_per_byte"] == pytest.approx(nll.sum() / np.log(2) / res["bytes"], rel=1e-9)
    assert [b["positions"] for b in res["buckets"]] == ["0-1K"] and res["buckets"][0]["tokens"] == nll.size


def test_indexer_picks_are_the_forwards_top_k(m):
    from flax import nnx

    from v4jax import model as M

    s = _grid(tasks=("niah_single_repeat",), lengths=(480,), depths=(0.5,), samples=1)[0]
    at = len(s.ids) - 1
    got = likelihood.score_rows(m.engine(2), [np.asarray(s.ids + [0])], pick_at=[at])[0]["picks"]
    fwd = M.forward_fn(nnx.graphdef(m.module))(nnx.state(m.module), np.asarray([s.ids]), np.zeros(1, np.int32), None)
    layers = run.csa_layers(m.config)
    assert layers == [1, 3] and len(got) == 2
    for layer, p in zip(layers, got):
        want = np.asarray(fwd["aux"][layer]["topk"])[0, at]
        assert sorted(p.tolist()) == sorted(want.tolist())
        assert p.size == m.config.index_topk and p.min() >= 0 and p.max() < (at + 1) // 4


def test_eval_niah_end_to_end(m, tmp_path, capsys):
    out = tmp_path / "r" / "niah.json"
    args = infer._parser().parse_args(
        ["eval", "--checkpoint", fixture_dir("tiny-a-fp8"), "--task", "niah", "--lengths", "448", "--depths", "0,1",
         "--samples", "1", "--batch", "2", "--niah-tasks", "niah_single_repeat,niah_multivalue", "--diagnose-indexer",
         "--out", str(out)])
    from v4jax.evaluation import cli

    assert cli.run(args, lambda: m) == 0
    table = capsys.readouterr().out
    assert "niah_single_repeat: mean exact match" in table and "indexer recall, layer 3" in table
    res = json.loads(out.read_text())
    assert res["lengths"] == [448] and res["depths"] == [0.0, 1.0] and res["max_context"] == 448 + cli.ANSWER_ROOM
    assert len(res["samples"]) == 4 and set(res["grid"]) == {"niah_single_repeat", "niah_multivalue"}
    for s in res["samples"]:
        assert 0.0 <= s["score"] <= 1.0 and set(s["indexer_recall"]) == {"1", "3"}
    assert os.path.getsize(res["heatmap"]) > 1000
    # the replies are the model's greedy continuations of the same prompts
    g = niah.build_grid(TOK, 0, ("niah_single_repeat", "niah_multivalue"), [448], [0.0, 1.0], 1, 0)
    assert [x.values for x in g] == [s["values"] for s in res["samples"]]
    assert run.niah_replies(m.engine(2), TOK, g[:1]) == [res["samples"][0]["reply"]]
    m.max_context = CTX


@pytest.mark.parametrize("argv, message", [
    (["--task", "ppl"], "--task ppl needs --data"),
    (["--task", "ppl", "--data", "/nonexistent/x.txt"], "--data /nonexistent/x.txt: no such file"),
    (["--task", "niah", "--niah-tasks", "niah_single,niah_x"], "unknown task 'niah_single'"),
    (["--task", "niah", "--depths", "0,1.5"], "every depth must be within"),
    (["--task", "niah", "--lengths", "1k"], "give comma-separated integers"),
    (["--task", "niah", "--lengths", "4090"], "--lengths 4090: longer than max_position_embeddings 4096"),
    (["--task", "niah", "--mode", "think"], "unknown mode 'think'"),
    (["--task", "niah", "--batch", "0"], "--batch must be >= 1"),
])
def test_bad_eval_options_are_one_line_and_exit_2(argv, message, capsys):
    rc = infer.main(["eval", "--checkpoint", fixture_dir("tiny-a-bf16"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err


# ------------------------------------------------------------------ the lm-eval-harness adapter
_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {kind}
{body}
"""
_BODIES = {
    "v4j_choice": ("multiple_choice", 'doc_to_text: "{{question}}"\ndoc_to_target: label\ndoc_to_choice: "{{choices}}"\n'
                   "metric_list:\n  - metric: acc\n"),
    "v4j_rolling": ("loglikelihood_rolling", 'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                    "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"),
    "v4j_generate": ("generate_until", 'doc_to_text: "{{question}}"\ndoc_to_target: "{{choices[0]}}"\n'
                     'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
                     "metric_list:\n  - metric: exact_match\n"),
}
_DOCS = [{"question": "def f(x):\n    return", "choices": [" x + 1", " banana"], "label": 0, "text": "import os\n"},
         {"question": "for i in", "choices": [" range(10):", " zzzz"], "label": 1, "text": "print('hello')\n"},
         {"question": "class A:", "choices": [" pass", "\n    def"], "label": 0, "text": "x = [1, 2, 3]\n"}]


def _direct_ll(m, context: str, continuation: str) -> float:
    ctx = list(TOK.encode(context))
    ids = np.asarray([0] + ctx + list(TOK.encode(continuation)))
    lp = np.asarray(jax.nn.log_softmax(m.score(ids[None])[0], -1))[np.arange(ids.size - 1), ids[1:]]
    return float(lp[len(ctx):].sum())


def test_lm_eval_runs_three_request_types_on_a_v4jax_checkpoint(m, tmp_path, monkeypatch):
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")
    from lm_eval.tasks import TaskManager

    from v4jax.lm_eval import V4JaxLM

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in _DOCS))
    for name, (kind, body) in _BODIES.items():
        (tmp_path / f"{name}.yaml").write_text(_TASK.format(name=name, data=data, kind=kind, body=body))
    lm = V4JaxLM.from_loaded(m, batch_size=2)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(_BODIES), task_manager=TaskManager(include_path=str(tmp_path)),
                                  log_samples=True, bootstrap_iters=0)
    samples = {t: sorted(res["samples"][t], key=lambda s: s["doc_id"]) for t in _BODIES}
    # multiple choice: every choice's log-likelihood is the full forward's, and acc follows from them
    right = 0
    for doc, s in zip(_DOCS, samples["v4j_choice"]):
        lls = [r[0][0] for r in s["resps"]]
        args = [a if isinstance(a, (list, tuple)) else (a["arg_0"], a["arg_1"]) for a in s["arguments"]]
        assert [a[1].strip() for a in args] == [c.strip() for c in doc["choices"]]
        want = [_direct_ll(m, *a) for a in args]  # (question, " " + choice): lm-eval's target delimiter
        assert np.abs(np.array(lls) - want).max() <= TOL
        right += int(np.argmax(want) == doc["label"])
    assert res["results"]["v4j_choice"]["acc,none"] == pytest.approx(right / len(_DOCS))
    # rolling: the whole text's log-likelihood after BOS
    for doc, s in zip(_DOCS, samples["v4j_rolling"]):
        assert s["resps"][0][0] == pytest.approx(_direct_ll(m, "", doc["text"]), abs=TOL)
    # generation: the greedy continuation, cut at the newline, as v4jax.load(...).generate gives it
    want = m.generate([d["question"] for d in _DOCS[:2]], max_new_tokens=6, stop=["\n"])
    assert [s["resps"][0][0] for s in samples["v4j_generate"][:2]] == want


def test_lm_eval_model_name_is_registered_and_arguments_checked():
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")
    from lm_eval.api.registry import get_model

    from v4jax.lm_eval import V4JaxLM

    assert get_model("v4jax") is V4JaxLM
    with pytest.raises(ValueError, match="unknown mode 'think'"):
        V4JaxLM(checkpoint=fixture_dir("tiny-a-bf16"), mode="think")
    with pytest.raises(ValueError, match="batch_size must be an integer, got 'x'"):
        V4JaxLM(checkpoint=fixture_dir("tiny-a-bf16"), batch_size="x")


# ------------------------------------------------------------------ the retrieval recipe's data
def test_recipe_documents_fill_one_row_each_and_answer_their_question():
    from v4jax.evaluation import recipe

    docs = recipe.training_documents(60, 512, seed=3)
    assert docs == recipe.training_documents(60, 512, seed=3)
    assert {len(d) for d in docs} == {510} and all(d.isascii() for d in docs)  # BOS + 510 bytes + EOS = 512
    kinds = {"passkey": 0, "magic": 0, "text": 0}
    for d in docs:
        if "Question:" not in d:
            kinds["text"] += 1
            continue
        asked = re.search(r"Question: what is the (pass key|special magic number for ([a-z]+-[a-z]+))\?", d)
        answer = re.search(r"is (\d+)\.$", d).group(1)
        if asked.group(1) == "pass key":
            kinds["passkey"] += 1
            assert re.search(r"The pass key is (\d+)\. Keep", d).group(1) == answer
        else:
            kinds["magic"] += 1
            assert answer in re.findall(rf"number for {asked.group(2)} is (\d+)\.", d[: d.index("Question:")])
    assert all(n >= 5 for n in kinds.values()), kinds
    # the evaluation grid (seed 0) shares no prompt with the training documents
    g = niah.build_grid(TOK, 0, ("passkey",), [512 - 1 - 7], [0.5], 20, seed=0)
    assert not {TOK.decode(s.ids[1:]) for s in g} & {d[:-7] for d in docs}


def test_recipe_smoke_trains_both_models_and_writes_the_table(tmp_path):
    """CI's short smoke of the recipe (3 steps, one per phase, 2 rows a step): every stage runs
    and the results are written; the accuracy targets are bench/retrieval.py's (python -m bench retrieval)."""
    from v4jax.evaluation import recipe

    res = recipe.run_recipe(str(tmp_path), steps=3, docs=16, samples=1, overrides=["batch=2"])
    assert res["phases"] == "dense:1,indexer_warmup:2,sparse" and res["seq_len"] == 512
    for k in ("v4", "v4_dense", "swa"):
        acc = res[k]["accuracy"]
        assert set(acc) == set(recipe.EVAL_TASKS) | {"mean"} and all(0 <= v <= 1 for v in acc.values())
        assert res[k]["prompts"] == len(recipe.EVAL_TASKS) * len(niah.DEPTHS)
    assert set(res["v4"]["indexer_recall"]) == {"0", "2", "3"} and res["v4"]["indexer_chance"] == 16 / 128
    assert "indexer_recall" not in res["swa"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["v4"]["accuracy"] == res["v4"]["accuracy"]
    assert (tmp_path / "results.md").read_text().startswith("| model | passkey |")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    metrics = [json.loads(x) for x in (tmp_path / "v4" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if "loss" in r] == [1, 2, 3]
    with pytest.raises(ValueError, match="--steps must be >= 3"):
        recipe.run_recipe(str(tmp_path / "x"), steps=2)
