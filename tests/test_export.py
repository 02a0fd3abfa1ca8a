"""v4jax.export: a model written as a hub directory (DeepSeek's names, dtypes and FP8/FP4 encodings)
that `load_hub` / `infer.py score` read back to the same logits; atomic, refusing to overwrite.

Compiles dominate this file's time: every model here shares one small config, and the reference
models are merged into the graphdefs the exports load with, so each forward compiles once."""
import functools
import json
import os
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from conftest import FIXTURES, fixture_dir
from v4jax import checkpoint, export, quant, scoring
from v4jax import model as M
from v4jax.config import ModelConfig
from v4jax.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import infer  # noqa: E402

FP8 = "tiny-a-fp8"


def _small_config() -> ModelConfig:
    """train-tiny cut to one hash-routed CSA layer (compressor, indexer) + its MTP block."""
    with open(os.path.join(FIXTURES, "train-tiny.json")) as f:
        raw = json.load(f)
    raw.update(num_hidden_layers=1, num_hash_layers=1, compress_ratios=[4, 0], sliding_window=16, index_topk=4)
    return ModelConfig.from_hub(raw)


def _random_model(cfg: ModelConfig, seed: int = 0):
    """Random weights filled from NumPy into the skeleton (eager `M.build` compiles for ~10 s)."""
    rng = np.random.default_rng(seed)
    sk = M.abstract(cfg)
    new = []
    for path, var in nnx.to_flat_state(nnx.state(sk)):
        if jnp.issubdtype(var.dtype, jnp.integer):  # the hash-routing table
            a = rng.integers(0, cfg.n_routed_experts, var.shape)
        elif "norm" in str(path[-2]):
            a = 1 + 0.1 * rng.standard_normal(var.shape)
        else:
            a = 0.05 * rng.standard_normal(var.shape)
        new.append((path, var.replace(jnp.asarray(a, var.dtype))))
    return nnx.merge(nnx.graphdef(sk), nnx.from_flat_state(new))


def _save_run(model, out: str, tokenizer: str | None):
    """A train.py run directory holding `model` at step 0, written by the Trainer's own save code."""
    _, params, rest = nnx.split(model, nnx.Param, ...)
    run = SimpleNamespace(manager=ocp.CheckpointManager(os.path.abspath(out)), ts={"params": params, "rest": rest},
                          rc=SimpleNamespace(out=out), cfg=model.cfg)
    run._meta = lambda: {"model_config": model.cfg.to_hub(), "run": {"tokenizer": tokenizer}}
    os.makedirs(out, exist_ok=True)
    Trainer._write_model_config(run)
    Trainer.save(run, 0)
    run.manager.wait_until_finished()


def _exported_values(model, fmt: str, keep_experts: bool = False) -> dict:
    """model path -> the float values an export of `model` in `fmt` holds: FP8 projections through
    `fp8_weight_fake`, FP4 experts through `fp4_weight_fake` (kept as they are with `keep_experts`),
    BF16 tensors rounded to bf16, F32 / integer ones unchanged."""
    fmts = {p: v.get_metadata().get("fmt")
            for p, v in nnx.to_flat_state(nnx.state(M.abstract(export.target_config(model.cfg, fmt))))}
    bf16 = {path for name, (path, _, _) in checkpoint.expected_tensors(model).items()
            if export.stored_dtype(name, None, False) == "BF16"}
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        a = var.get_value()
        if fmts[path] == "fp8":
            a = _FP8(a)
        elif fmts[path] == "fp4" and not keep_experts:
            a = _FP4(a)
        elif path in bf16 and not fmts[path]:
            a = a.astype(jnp.bfloat16).astype(a.dtype)
        out[path] = a
    return out


# one compile per shape (eager, every op of the quantisers would compile on its own)
_FP8, _FP4 = jax.jit(quant.fp8_weight_fake), jax.jit(quant.fp4_weight_fake)
_FP4_CODES = jax.jit(functools.partial(quant.fp4_weight_fake, return_scale=True))


def _merged(like, values: dict):
    """A model of `like`'s graphdef holding `values` by path, placed like `like`'s arrays (same dtypes and
    shardings: its compiled forward is reused)."""
    flat = nnx.to_flat_state(nnx.state(like))
    return nnx.merge(nnx.graphdef(like), nnx.from_flat_state([
        (p, v.replace(jax.device_put(jnp.asarray(values[p], v.dtype), v.get_value().sharding))) for p, v in flat]))


def _host_tensors(model) -> dict:
    """checkpoint.hub_tensors, indexing on the host (eager device indexing compiles once per index)."""
    flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
    return {name: flat[p][idx] for name, (p, idx, _) in checkpoint.expected_tensors(model).items()}


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def fp8_model():
    return checkpoint.load_hub(fixture_dir(FP8), progress=False)


@pytest.fixture(scope="module")
def small():
    return _random_model(_small_config())


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(1).integers(0, 320, (2, 32)).astype(np.int32)


# ------------------------------------------------------------------ 1. the release's checkpoint
def test_release_checkpoint_round_trips_byte_for_byte(fp8_model, tmp_path):
    out = tmp_path / "hub"
    res = export.export(fp8_model, str(out), "fp4-experts", progress=False)
    got, want = checkpoint.SafetensorsDir(str(out)), checkpoint.SafetensorsDir(fixture_dir(FP8))
    assert set(got.entries) == set(want.entries)
    compared = 0
    for name in want.entries:
        assert got.entries[name][1:3] == want.entries[name][1:3], name  # dtype, shape
        a, b = got.read(name), want.read(name)
        assert a.tobytes() == b.tobytes(), name
        compared += b.nbytes
    assert compared == res["bytes"] == 4_536_957
    # the same layout as DeepSeek's files: the whole file is identical
    with open(out / res["files"][0], "rb") as f, open(os.path.join(fixture_dir(FP8), "model.safetensors"), "rb") as g:
        assert f.read() == g.read()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == compared and set(index["weight_map"]) == set(want.entries)
    assert ModelConfig.from_hub(str(out)) == ModelConfig.from_hub(fixture_dir(FP8))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == export.QUANTIZATION_CONFIG and cfg["expert_dtype"] == "fp4"


def test_other_formats_of_the_release_hold_its_values(fp8_model, tmp_path):
    """bf16 (FP8/FP4 dequantised, exact in bf16) and fp8 (FP4 experts re-quantised to FP8 128x128, lossless
    for these weights): loaded and dequantised, every tensor equals the release's."""
    want = _host_tensors(checkpoint.load_hub(fixture_dir(FP8), native_weights=False, progress=False))
    for fmt in ("bf16", "fp8"):
        export.export(fp8_model, str(tmp_path / fmt), fmt, progress=False)
        got = _host_tensors(checkpoint.load_hub(str(tmp_path / fmt), native_weights=False, progress=False))
        assert set(got) == set(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{fmt}: {name}")
    bf16 = checkpoint.SafetensorsDir(str(tmp_path / "bf16"))
    release_bf16 = checkpoint.SafetensorsDir(fixture_dir("tiny-a-bf16"))
    assert {n: e[1:3] for n, e in bf16.entries.items()} == {n: e[1:3] for n, e in release_bf16.entries.items()}


# ------------------------------------------------------------------ 2. train.py run -> CLI -> score
def test_run_directory_exports_and_scores_through_the_cli(small, ids, tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (tok_dir / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    run = tmp_path / "run"
    _save_run(small, str(run), str(tok_dir / "tokenizer.json"))
    np.save(tmp_path / "ids.npy", ids)
    scores = {}
    for fmt in ("bf16", "fp8"):
        hub = tmp_path / fmt
        assert export.main(["--checkpoint", str(run), "--out", str(hub), "--format", fmt, "--shard-size", "100kB",
                            "--no-progress"]) == 0
        assert len([f for f in os.listdir(hub) if f.endswith(".safetensors")]) > 1  # sharded
        for fn in ("tokenizer.json", "tokenizer_config.json"):
            assert (hub / fn).read_bytes() == (tok_dir / fn).read_bytes()
        assert infer.main(["score", "--checkpoint", str(hub), "--tokens", str(tmp_path / "ids.npy"),
                           "--out", str(tmp_path / f"{fmt}.npz")]) == 0
        scores[fmt] = dict(np.load(tmp_path / f"{fmt}.npz"))
    float_layout = checkpoint.load_hub(str(tmp_path / "bf16"), progress=False)  # the graphdef bf16 scored with
    for fmt in ("bf16", "fp8"):
        want = scoring.score(_merged(float_layout, _exported_values(small, fmt)), ids)
        for key in ("logits", "mtp_logits"):
            rel = _rel(scores[fmt][key], want[key])
            print(f"{fmt} export vs the {fmt}-cast model, {key}: max |dlogit| / max |logit| = {rel:.2e}")
            assert rel <= 1e-6, (fmt, key)
    fp32 = scoring.score(_merged(float_layout, {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(small))}),
                         ids)["logits"]
    print(f"bf16 export vs the fp32 run: max |dlogit| = {np.abs(scores['bf16']['logits'] - fp32).max():.2e}, "
          f"fp8: {np.abs(scores['fp8']['logits'] - fp32).max():.2e} (max |logit| {np.abs(fp32).max():.2f})")
    assert ModelConfig.from_hub(str(tmp_path / "fp8")).weight_format == "fp8"


# ------------------------------------------------------------------ 3. FP4 QAT -> the release format
def test_fp4_qat_model_exports_its_training_weights(small, ids, tmp_path):
    cfg = small.cfg.with_runtime(qat_fp4_experts=True)
    # non-expert tensors already in their export formats, so the logits isolate the experts' path
    qat = _merged(M.abstract(cfg), _exported_values(small, "fp4-experts", keep_experts=True))
    hub = tmp_path / "hub"
    export.export(qat, str(hub), "fp4-experts", progress=False)
    st = checkpoint.SafetensorsDir(str(hub))
    flat = dict(nnx.to_flat_state(nnx.state(qat)))
    worst = 0.0
    for name, (path, idx, _) in checkpoint.expected_tensors(qat).items():
        if ".experts." not in name:
            continue
        w = np.asarray(flat[path].get_value())[idx]
        _, q, s = _FP4_CODES(w)
        assert st.dtype(name) == "I8" and st.dtype(name[:-7] + ".scale") == "F8_E8M0"
        np.testing.assert_array_equal(st.read(name), quant.pack_fp4(np.asarray(q, np.float32)), name)
        np.testing.assert_array_equal(st.read(name[:-7] + ".scale"), quant.e8m0_bytes(s), name)
        fp4 = _FP4(w)  # the QAT forward re-quantises to FP8 128x128: lossless here?
        worst = max(worst, float(jnp.abs(_FP8(fp4) - fp4).max()))
    print(f"QAT experts: max |fp8(fp4(w)) - fp4(w)| = {worst:.2e}")
    loaded = checkpoint.load_hub(str(hub), progress=False)
    got = scoring.score(loaded, ids, with_mtp=False)["logits"]
    want = scoring.score(qat, ids, with_mtp=False)["logits"]
    rel = _rel(got, want)
    print(f"fp4-experts export vs the QAT forward: max |dlogit| / max |logit| = {rel:.2e}")
    assert worst == 0.0 and rel <= 1e-6


# ------------------------------------------------------------------ 4. atomicity, refusal
def test_failed_export_leaves_nothing_and_existing_out_is_refused(fp8_model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "hub"
    real, calls = export._write_shard, []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        return real(*args, **kw)

    monkeypatch.setattr(export, "_write_shard", failing)
    with pytest.raises(OSError, match="injected"):
        export.export(fp8_model, str(out), "fp4-experts", shard_bytes=1_000_000, progress=False)
    assert len(calls) == 2 and os.listdir(tmp_path) == []  # neither --out nor the temporary directory
    monkeypatch.setattr(export, "_write_shard", real)

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(export.ExportError, match="exists and is not empty"):
        export.export(fp8_model, str(out), "bf16", progress=False)
    assert export.main(["--checkpoint", fixture_dir(FP8), "--out", str(out), "--no-progress"]) == 2
    assert "exists and is not empty (pass --force" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
    with pytest.raises(export.ExportError, match="unknown export format 'fp16'"):
        export.export(fp8_model, str(tmp_path / "x"), "fp16", progress=False)
    export.export(fp8_model, str(out), "fp8", shard_bytes=1_000_000, force=True, progress=False)
    assert "keep.txt" not in os.listdir(out) and sorted(os.listdir(tmp_path)) == ["hub"]
    assert ModelConfig.from_hub(str(out)).expert_dtype is None  # fp8: the experts in FP8 too
    assert checkpoint.SafetensorsDir(str(out)).dtype("layers.0.ffn.experts.0.w1.weight") == "F8_E4M3"


# ------------------------------------------------------------------ 5. Hugging Face transformers
def test_transformers_loads_the_export(fp8_model, tmp_path):
    pytest.importorskip("torch", reason="torch is not installed")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    if not hasattr(transformers, "DeepseekV4ForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no DeepseekV4ForCausalLM")
    out = tmp_path / "hub"
    export.export(fp8_model, str(out), "fp4-experts", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.num_hidden_layers == fp8_model.cfg.num_hidden_layers
