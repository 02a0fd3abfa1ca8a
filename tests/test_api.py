"""The Python API (`v4jax.load` -> generate / chat / score) against the fixture's official logits and
against `infer.py generate`, on one model loaded once (few compiles)."""
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import v4jax
from conftest import fixture_dir
from v4jax.checkpoint import CheckpointError
from v4jax.validate import ConfigError

CTX = 256
TOL = 1e-4  # as tests/test_parity.py


@pytest.fixture(scope="module")
def m():
    return v4jax.load(fixture_dir("tiny-a-bf16"), max_context=CTX)


def test_load_gives_config_module_and_byte_tokenizer(m):
    from v4jax.data import ByteTokenizer

    assert m.config.vocab_size == 1024 and m.module.cfg is m.config
    assert isinstance(m.tokenizer, ByteTokenizer)  # the fixture has no tokenizer.json
    assert "max_context 256" in repr(m)


def test_score_equals_the_official_forward_logits(m, expected):
    e = expected["tiny-a-bf16"]
    got = m.score(e["tokens"])
    assert got.shape == e["logits_full"].shape and got.dtype == np.float32
    assert np.abs(got - e["logits_full"]).max() <= TOL
    text = m.score("ab")  # a text: BOS + its tokens, as one sequence [S] -> [1, S, V]
    assert text.shape == (1, 3, 1024)
    np.testing.assert_array_equal(text, m.score(np.array(m.prompt_ids("ab"))))


def test_generate_prints_what_infer_generate_prints(m, capsys):
    import infer

    rc = infer.main(["generate", "--checkpoint", fixture_dir("tiny-a-bf16"), "--prompt", "def main(",
                     "--mode", "raw", "--max-new-tokens", "12", "--max-context", str(CTX)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    text = m.generate("def main(", max_new_tokens=12)
    assert isinstance(text, str) and cap.out == text + "\n"
    assert len(m.last_result["outputs"][0].tokens) == 12
    assert m.generate("def main(", max_new_tokens=12, speculative=True) == text  # MTP drafts, same output


def test_a_list_of_prompts_gives_a_list(m):
    prompts = ["def main(", "x = [1, 2"]
    out = m.generate(prompts, max_new_tokens=6)
    assert isinstance(out, list) and out == [m.generate(p, max_new_tokens=6) for p in prompts]


def test_chat_keeps_one_conversation(m):
    msg = "Please tell me a long story about a cat that lives in a lighthouse by the sea."  # past the window
    m.reset_chat()
    first = m.chat(msg, max_new_tokens=12)
    second = m.chat("And then?", max_new_tokens=12)
    msgs = m.messages
    assert [x["role"] for x in msgs] == ["user", "assistant"] * 2
    assert msgs[0]["content"] == msg and msgs[1]["content"] == first and msgs[3]["content"] == second
    m.reset_chat()
    assert m.messages == []
    assert m.chat(msg, max_new_tokens=12) == first
    # generate() reuses the chat's engine (its entries overwritten): the next turn prefills afresh
    m.generate("x = [1, 2, 3]; y = {'a': 1}; " * 3, max_new_tokens=8)
    assert m.chat("And then?", max_new_tokens=12) == second and len(m.messages) == 4


def test_refusals_are_the_cli_messages(m, tmp_path):
    with pytest.raises(ValueError, match="exceed the maximum context of 256"):
        m.generate("x" * 300)
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        m.generate("Hi", mode="fast")
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        m.generate("Hi", temperature=-1.0)
    with pytest.raises(ValueError, match="speculative=True reproduces greedy decoding"):
        m.generate("Hi", temperature=0.7, speculative=True)
    with pytest.raises(ValueError, match="token id 2000 is out of range"):
        m.score(np.array([[5, 2000, 7]]))
    m.reset_chat()
    with pytest.raises(ValueError, match="would fill the context"):
        m.chat("y" * 300)
    assert m.messages == []  # the refused turn is not kept
    with pytest.raises(ConfigError, match="did you mean 'qat_sim'"):
        v4jax.load(fixture_dir("tiny-a-bf16"), qat_simm=True)
    with pytest.raises(ValueError, match="weights='fp4'"):
        v4jax.load(fixture_dir("tiny-a-bf16"), weights="fp4")
    with pytest.raises(CheckpointError, match="no such directory"):
        v4jax.load(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="neither a hub-format checkpoint"):
        v4jax.load(tmp_path)
    with pytest.raises(ValueError, match=r"max_context must be within 1\.\.4096"):
        v4jax.load(fixture_dir("tiny-a-bf16"), max_context=5000)


def _fake_run_dir(m, out):
    """A train.py --out directory holding the fixture's weights as step 0 (orbax, the layout
    trainer.load_trained reads), made without training."""
    import orbax.checkpoint as ocp

    _, params, rest = nnx.split(m.module, nnx.Param, ...)
    state = {"params": nnx.to_pure_dict(params), "rest": nnx.to_pure_dict(rest)}
    mgr = ocp.CheckpointManager(os.path.abspath(out))
    mgr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    mgr.wait_until_finished()
    mgr.close()


def test_a_training_run_directory_loads_and_shards(m, expected, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(os.path.join(fixture_dir("tiny-a-bf16"), "config.json"), out / "config.json")
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        v4jax.load(out)
    _fake_run_dir(m, out)
    r = v4jax.load(out, mesh="tensor=2", max_context=CTX)
    assert any(len(x.sharding.device_set) == 2 for x in jax.tree.leaves(nnx.state(r.module)))
    tokens = expected["tiny-a-bf16"]["tokens"][:, :64]
    assert np.abs(r.score(tokens) - expected["tiny-a-bf16"]["logits_full"][:, :64]).max() <= TOL
