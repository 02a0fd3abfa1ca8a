"""The long-context retrieval recipe: a small V4 (a 32-token window, so anything further away must
come through CSA / HCA) trained on the CPU to retrieve far beyond its window, beside its SWA-only twin.

  python -m v4jax.evaluation.recipe [--quick] [--out runs/retrieval] [--steps N] [--eval-samples N]

1. data: `--docs` training documents of exactly seq_len tokens with the byte tokenizer (BOS + text +
   EOS; one per packed row): pass-key, single-needle (repeated and essay filler) and multi-key
   retrieval in the NIAH format (v4jax.evaluation.niah, seeds disjoint from the evaluation's), plus
   plain prose; the question and answer close every retrieval document.
2. training (configs/recipes/retrieval.toml): the V4 model with the sparse-attention phases
   (dense CSA -> indexer warm-up -> sparse top-k), and the same run with every layer SWA-only
   (compress_ratios all 0: the twin can only see 32 tokens back).
3. evaluation at seq_len = 16x the window: exact match per task of both models (greedy replies
   through the decode engine), the V4 model also with csa_mode=dense (every compressed entry: what
   the switch to top-k costs), and the indexer's recall of the needle's entries (chance: top-k /
   entries). Results: OUT/results.json, OUT/results.md (the table), OUT/curves.png.

`--quick` (bench suite): fewer documents, steps and prompts; it checks that accuracy rises above
the SWA twin's, not the full targets.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

from . import niah, run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "configs", "recipes", "retrieval.toml")
TRAIN_TASKS = ("passkey", "niah_single_repeat", "niah_single_essay", "niah_multikey")
MIX = {"passkey": 0.25, "niah_single_repeat": 0.2, "niah_single_essay": 0.2, "niah_multikey": 0.2, "text": 0.15}
EVAL_TASKS = TRAIN_TASKS
TRAIN_SEED = 10_000  # the evaluation grid uses seed 0: no training prompt is an evaluation prompt


def training_documents(n: int, seq_len: int, seed: int = TRAIN_SEED) -> list[str]:
    """n texts of seq_len - 2 bytes each (ASCII; with BOS and EOS one packed row of seq_len tokens)."""
    from ..data import ByteTokenizer

    tok, rng = ByteTokenizer(), np.random.default_rng(seed)
    pieces, sentences = niah._Pieces(tok), niah.local_sentences()
    sentences = [s for s in sentences if s.isascii()]
    kinds, weights = list(MIX), np.array(list(MIX.values()))
    size = seq_len - 2
    out = []
    for _ in range(n):
        kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
        if kind == "text":
            text = ""
            while len(text) < size + 1:  # every sentence starts with a space: the first is cut off
                text += sentences[rng.integers(len(sentences))]
            out.append(text[1: size + 1])
            continue
        answer_len = len(" " + "0" * (5 if kind == "passkey" else 7) + ".")
        s = niah.make_sample(kind, size + 1 - answer_len, float(rng.uniform()), rng, pieces, sentences, tok.bos_id)
        text = tok.decode(s.ids[1:]) + " " + s.values[0] + "."
        assert len(text) == size, (kind, len(text))
        out.append(text)
    return out


def write_jsonl(path: str, docs: list[str]) -> None:
    from ..rundir import write_atomic

    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, "".join(json.dumps({"text": d}) + "\n" for d in docs))


def twin_config(src: str, dst: str) -> str:
    """The model config with every layer SWA-only (compress_ratios all 0), written to dst."""
    with open(src) as f:
        cfg = json.load(f)
    cfg["compress_ratios"] = [0] * len(cfg["compress_ratios"])
    with open(dst, "w") as f:
        json.dump(cfg, f, indent=1)
    return dst


def train(out: str, config: str, data: str, steps: int, phases: str, overrides: list[str], log=print) -> dict:
    from ..trainer import RunConfig, Trainer

    rc = RunConfig.load(RECIPE, overrides, out=out, config=config, data=data, steps=steps, phases=phases)
    t0 = time.time()
    res = Trainer(rc).run(log=log, bar=False)
    return {"seconds": time.time() - t0, "final_loss": res.get("loss") if isinstance(res, dict) else None}


def evaluate(run_dir: str, length: int, samples: int, diagnose: bool, log=print, **runtime) -> dict:
    """Exact match per task (and indexer recall per CSA layer) of the run's latest checkpoint."""
    import v4jax

    m = v4jax.load(run_dir, max_context=length + 64, **runtime)
    grid = niah.build_grid(m.tokenizer, m.config.bos_token_id, EVAL_TASKS, [length], niah.DEPTHS, samples, seed=0)
    eng = m.engine(8)
    t0 = time.time()
    replies = run.niah_replies(eng, m.tokenizer, grid)
    scores = [niah.score(s, r) for s, r in zip(grid, replies)]
    out = {"accuracy": {t: float(np.mean([sc for s, sc in zip(grid, scores) if s.task == t])) for t in EVAL_TASKS},
           "eval_seconds": time.time() - t0, "prompts": len(grid)}
    out["accuracy"]["mean"] = float(np.mean(scores))
    if diagnose and run.csa_layers(m.config):
        rec = run.indexer_recalls(eng, grid)
        layers = sorted(rec[0])
        out["indexer_recall"] = {str(k): float(np.mean([r[k] for r in rec])) for k in layers}
        c = m.config
        out["indexer_chance"] = min(1.0, c.index_topk / (length // 4))
    log(f"{run_dir} ({runtime or 'sparse'}): " + ", ".join(f"{k} {v:.3f}" for k, v in out["accuracy"].items()))
    return out


def curves(runs: dict, path: str) -> None:
    """Training cross-entropy of every run (metrics.jsonl: "ce", the loss without the indexer's KL and
    the MTP / balance terms; during the indexer warm-up the optimised loss is the KL alone), raw and as
    a 20-step moving average, in one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..rundir import read_metrics

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for (name, d), color in zip(runs.items(), ("tab:blue", "tab:orange")):
        last = {r["step"]: r for r in read_metrics(os.path.join(d, "metrics.jsonl")) if "loss" in r}
        recs = [last[k] for k in sorted(last)]  # a rolled-back step's record is replaced by its rerun's
        steps = np.array([r["step"] for r in recs])
        ce = np.array([r.get("ce", r["loss"]) for r in recs])
        ax.plot(steps, ce, color=color, lw=0.5, alpha=0.35)
        k = min(20, len(ce))
        if k:
            ax.plot(steps[k - 1:], np.convolve(ce, np.ones(k) / k, mode="valid"), color=color, lw=1.5, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training cross-entropy")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp.{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def table(res: dict) -> str:
    rows = [("V4 (CSA/HCA, sparse top-k)", res["v4"]), ("V4, dense CSA at evaluation", res["v4_dense"]),
            ("SWA-only twin", res["swa"])]
    head = "| model | " + " | ".join(EVAL_TASKS) + " | mean |"
    lines = [head, "|" + "---|" * (len(EVAL_TASKS) + 2)]
    for name, r in rows:
        acc = r["accuracy"]
        cells = [f"{100 * acc[t]:.1f}" for t in EVAL_TASKS] + [f"{100 * acc['mean']:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rec = res["v4"].get("indexer_recall")
    if rec:
        lines.append("")
        lines.append("Indexer recall of the needle's entries (top-k at the question's last token): " +
                     ", ".join(f"layer {k} {100 * v:.1f}%" for k, v in rec.items()) +
                     f" (chance {100 * res['v4']['indexer_chance']:.1f}%)")
    return "\n".join(lines)


def run_recipe(out: str, quick: bool = False, steps: int | None = None, docs: int | None = None,
               samples: int | None = None, overrides=(), log=print) -> dict:
    """Data, both trainings and the three evaluations (module docstring) -> the results dict (also in
    OUT/results.json, OUT/results.md, OUT/curves.png). Existing runs in OUT are resumed."""
    from ..rundir import write_atomic
    from ..trainer import RunConfig

    steps = steps or (40 if quick else 600)
    docs = docs or (400 if quick else 6000)
    samples = samples or (2 if quick else 8)
    overrides = list(overrides)
    rc = RunConfig.load(RECIPE, overrides)
    if not os.path.exists(rc.config):  # the recipe's own config, from any working directory
        rc = dataclasses.replace(rc, config=os.path.join(ROOT, rc.config))
    seq_len = rc.seq_len
    if steps < 3:
        raise ValueError(f"--steps must be >= 3 (one per sparse-attention phase), got {steps}")
    data = os.path.join(out, "data", "train.jsonl")
    t0 = time.time()
    if not os.path.exists(data):
        write_jsonl(data, training_documents(docs, seq_len))
    d1, d2 = max(1, int(steps * 0.3)), max(2, int(steps * 0.45))
    runs = {"v4": os.path.join(out, "v4"), "swa": os.path.join(out, "swa")}
    twin = twin_config(rc.config, os.path.join(out, "swa-model.json"))
    timing = {"v4": train(runs["v4"], rc.config, data, steps, f"dense:{d1},indexer_warmup:{d2},sparse", overrides, log),
              "swa": train(runs["swa"], twin, data, steps, "", overrides, log)}
    res = {"seq_len": seq_len, "window": 32, "steps": steps, "phases": f"dense:{d1},indexer_warmup:{d2},sparse",
           "docs": docs, "samples_per_cell": samples, "train": timing,
           "v4": evaluate(runs["v4"], seq_len, samples, diagnose=True, log=log),
           "v4_dense": evaluate(runs["v4"], seq_len, samples, diagnose=False, log=log, csa_mode="dense"),
           "swa": evaluate(runs["swa"], seq_len, samples, diagnose=False, log=log)}
    res["wall_seconds"] = time.time() - t0
    write_atomic(os.path.join(out, "results.json"), json.dumps(res, indent=1) + "\n")
    write_atomic(os.path.join(out, "results.md"), table(res) + "\n")
    try:
        curves(runs, os.path.join(out, "curves.png"))
    except ImportError:
        log("no curves: matplotlib is not installed")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m v4jax.evaluation.recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/retrieval", help="directory of the data, both runs and the results")
    p.add_argument("--quick", action="store_true", help="a few-minute variant (bench suite): fewer docs and steps")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default: 600; quick 40)")
    p.add_argument("--docs", type=int, default=None, help="training documents (default: 6000; quick 400)")
    p.add_argument("--eval-samples", type=int, default=None, dest="samples",
                   help="prompts per (task, depth) cell (default: 8; quick 2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run setting for both runs")
    args = p.parse_args(argv)
    try:
        res = run_recipe(args.out, args.quick, args.steps, args.docs, args.samples, args.set)
    except ValueError as e:  # ConfigError, DataError included: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(res))
    print(f"wall time {res['wall_seconds'] / 60:.1f} min; results in {args.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
