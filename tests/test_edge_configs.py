"""Edge configurations the official code runs, computed by v4jax with the official formulas.

Every model here has random weights written as a hub checkpoint (config.json + model.safetensors) and
loaded back; its logits are checked against `official_ref` (a float64 NumPy reading of the official
inference code, itself checked against the oracle fixture first) and against v4jax's own prefill +
one-token decode. The edge cases:
  * "indexer_rope_only": index_head_dim == qk_rope_head_dim (the indexer's non-RoPE part is empty),
    one routed expert per token, no hash layers, no MTP block, a window longer than the sequence;
  * "one_group_full_window": o_groups 1, a window exactly as long as the sequence, a main head that is
    all RoPE (head_dim == qk_rope_head_dim), 0 Sinkhorn iterations, and more hash layers than main
    layers (the official rule then hash-routes the MTP block too);
  * no main layers at all (embedding -> HC head -> head, plus the MTP block).
The indexer itself (scores and chosen entries) is compared layer by layer for index_head_dim == rd, a
non-power-of-two index_head_dim (the official Hadamard transform zero-pads) and index_topk 0.
"""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import official_ref as R
from conftest import fixture_dir
from v4jax import checkpoint, quant, scoring
from v4jax import model as M
from v4jax.attention import index_scores
from v4jax.config import ConfigError, ModelConfig
from v4jax.layers import rope_cos_sin, rope_inv_freq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
SEQ, PREFILL = 40, 33  # 33 = 1 mod 4 and mod 8: the decode steps finish compressor blocks mid-run

BASE = dict(ModelConfig.tiny().to_hub(), num_hidden_layers=1, compress_ratios=[0, 4], swiglu_limit=1.5,
            index_topk=4)
EDGES = {
    "indexer_rope_only": dict(index_head_dim=64, num_experts_per_tok=1, num_hash_layers=0,
                              num_nextn_predict_layers=0, sliding_window=SEQ + 8, compress_ratios=[4]),
    "one_group_full_window": dict(o_groups=1, sliding_window=SEQ, head_dim=64, hc_sinkhorn_iters=0,
                                  num_hash_layers=3, compress_ratios=[4, 0]),
}


def _config(**edits) -> ModelConfig:
    return ModelConfig.from_hub({**BASE, **edits})


def _random_tensors(cfg: ModelConfig, seed: int) -> dict:
    """name -> array for every tensor of a hub checkpoint of `cfg`, random at the scales of a trained model
    (matrices 1/sqrt(fan_in), norms ~1, sinks, position biases, HC gates and selection biases O(0.1-1))."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (_, _, shape) in sorted(checkpoint.expected_tensors(cfg).items()):
        if name.endswith("tid2eid"):  # a token -> k distinct experts table
            a = np.argsort(rng.random((shape[0], cfg.n_routed_experts)), axis=-1)[:, :shape[1]]
            out[name] = a.astype(np.int32)
            continue
        z = rng.standard_normal(shape)
        if name.endswith("norm.weight"):
            z = 1 + 0.1 * z
        elif name.endswith("_scale"):
            z = rng.uniform(0.2, 1.0, shape)
        elif name.endswith(("_base", "ape")):
            z = 0.5 * z
        elif name.endswith("gate.bias"):
            z = 0.1 * z
        elif not name.endswith(("attn_sink", "embed.weight")):
            z = z / np.sqrt(shape[-1])
        out[name] = z.astype(np.float32)
    return out


def _write_hub(path, cfg: ModelConfig, seed: int) -> dict:
    os.makedirs(path, exist_ok=True)
    tensors = _random_tensors(cfg, seed)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hub(), f)
    return {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in tensors.items()}


def _prefill_then_steps(m, ids, n: int) -> np.ndarray:
    """Logits of a prefill of n tokens, then one-token steps, through the stateful decode path."""
    run, params = scoring._chunk_step(nnx.graphdef(m)), nnx.state(m)
    b, s = ids.shape
    state = m.init_state(b, s)
    parts = []
    for p0, p1 in [(0, n)] + [(p, p + 1) for p in range(n, s)]:
        logits, state = run(params, jnp.asarray(ids[:, p0:p1]), jnp.full((b,), p0, jnp.int32), state)
        parts.append(np.asarray(logits))
    return np.concatenate(parts, axis=1)


def _ids(cfg, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, SEQ)).astype(np.int32)


_BUILT: dict = {}


def _build_edge(name: str, tmp_path_factory) -> dict:
    """One edge model (built once per session): its hub dir, reference tensors, v4jax model, the official
    reading and v4jax's logits."""
    if name in _BUILT:
        return _BUILT[name]
    cfg = _config(**EDGES[name])
    path = str(tmp_path_factory.mktemp(name))
    t = _write_hub(path, cfg, seed=len(name))
    m = checkpoint.load_hub(path)
    ids = _ids(cfg)
    ref, streams, ref_topk = R.forward(t, cfg, ids)
    g, p = nnx.split(m)
    full = M.forward_fn(g)(p, jnp.asarray(ids), jnp.zeros((2,), jnp.int32), None)
    _BUILT[name] = {"name": name, "cfg": cfg, "path": path, "t": t, "model": m, "ids": ids, "ref": ref,
                    "streams": streams, "ref_topk": ref_topk, "full": full}
    return _BUILT[name]


@pytest.fixture(scope="module", params=sorted(EDGES))
def edge(request, tmp_path_factory):
    return _build_edge(request.param, tmp_path_factory)


def test_reference_reproduces_the_oracle(expected):
    """`official_ref` against the official code's own outputs (tiny-a-bf16, row 0, 160 tokens: the CSA
    layers already choose 16 of up to 40 entries): logits, indexer choices, MTP."""
    m = checkpoint.load_hub(fixture_dir("tiny-a-bf16"))
    t = {k: np.asarray(v).astype(np.float64) if np.asarray(v).dtype.kind in "fV" else np.asarray(v)
         for k, v in checkpoint.hub_tensors(m).items()}
    e, s = expected["tiny-a-bf16"], 160
    ids = e["tokens"][:1, :s]
    logits, streams, topk = R.forward(t, m.cfg, ids)
    assert np.abs(logits[0] - e["logits_full"][0, :s]).max() <= 2e-5
    for layer in (1, 3):
        ref = e[f"indexer_topk_layer{layer}"][0, :s]
        assert all(set(topk[layer][0, i]) == set(ref[i]) for i in range(s)), layer
    mtp = R.mtp(t, m.cfg, streams[:, :-1], ids[:, 1:])
    assert np.abs(mtp[0] - e["logits_mtp_row0"][:s - 1]).max() <= 2e-5


def test_forward_matches_the_official_reading(edge):
    got = np.asarray(edge["full"]["logits"])
    err = np.abs(got - edge["ref"]).max()
    print(f"{edge['name']}: full forward vs official reading max |d| = {err:.2e}")
    assert got.shape == (2, SEQ, edge["cfg"].vocab_size) and np.abs(edge["ref"]).max() > 1.0
    assert err <= TOL, err
    for layer, ref in edge["ref_topk"].items():  # the CSA layers' indexer choices, as sets
        if ref is not None:
            v4 = np.asarray(edge["full"]["aux"][layer]["topk"])
            assert all(set(v4[b, i]) == set(ref[b, i]) for b in range(2) for i in range(SEQ)), layer


def test_prefill_then_decode_equals_forward(edge):
    pd = _prefill_then_steps(edge["model"], edge["ids"], PREFILL)
    err_full = np.abs(pd - np.asarray(edge["full"]["logits"])).max()
    err_ref = np.abs(pd - edge["ref"]).max()
    print(f"{edge['name']}: prefill {PREFILL} + {SEQ - PREFILL} decode steps vs forward {err_full:.2e}, "
          f"vs official reading {err_ref:.2e}")
    assert err_full <= TOL and err_ref <= TOL, (err_full, err_ref)


def test_mtp_block_matches_the_official_reading(edge):
    cfg, m = edge["cfg"], edge["model"]
    if not cfg.n_mtp:
        assert len(m.mtp) == 0 and not any(name.startswith("mtp.") for name in edge["t"])
        return
    assert m.mtp[0].ffn.gate.is_hash == (cfg.num_hidden_layers < cfg.num_hash_layers)
    g, p = nnx.split(m)
    ids = jnp.asarray(edge["ids"])
    got = np.asarray(M.mtp_fn(g)(p, edge["full"]["streams"][:, :-1], ids[:, 1:], None, None)[0])
    ref = R.mtp(edge["t"], cfg, edge["streams"][:, :-1], edge["ids"][:, 1:])
    err = np.abs(got - ref).max()
    print(f"{edge['name']}: MTP block vs official reading max |d| = {err:.2e}")
    assert err <= TOL, err


def test_hub_checkpoint_scores_through_the_cli(tmp_path, tmp_path_factory):
    """`infer.py score` (its main(), in this process) on the hub checkpoint of the issue's case:
    index_head_dim == qk_rope_head_dim."""
    edge = _build_edge("indexer_rope_only", tmp_path_factory)
    assert edge["cfg"].index_head_dim == edge["cfg"].qk_rope_head_dim
    spec = importlib.util.spec_from_file_location("infer_cli", os.path.join(ROOT, "infer.py"))
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)
    np.save(tmp_path / "tokens.npy", edge["ids"])
    out = tmp_path / "out.npz"
    assert infer.main(["score", "--checkpoint", edge["path"], "--tokens", str(tmp_path / "tokens.npy"),
                       "--out", str(out)]) == 0
    got = np.load(out)
    assert "mtp_logits" not in got  # the model has no MTP block
    err = np.abs(got["logits"] - edge["ref"]).max()
    print(f"infer.py score vs official reading max |d| = {err:.2e}")
    assert got["logits"].shape == (2, SEQ, edge["cfg"].vocab_size) and err <= TOL, err


def test_no_main_layers(tmp_path):
    """num_hidden_layers 0: embedding -> HC head -> head (the official loop builds no block), plus MTP."""
    cfg = _config(num_hidden_layers=0, num_hash_layers=0, compress_ratios=[0])
    t = _write_hub(str(tmp_path), cfg, seed=5)
    m = checkpoint.load_hub(str(tmp_path))
    ids = _ids(cfg, seed=1)[:, :12]
    out = scoring.score(m, ids)
    ref, streams, _ = R.forward(t, cfg, ids)
    assert np.abs(out["logits"] - ref).max() <= TOL
    assert np.abs(out["mtp_logits"] - R.mtp(t, cfg, streams[:, :-1], ids[:, 1:])).max() <= TOL


@nnx.jit
def _v4_indexer_layer(attn, x_btd):
    """One attention layer from position 0 -> (out, its top-k ids, indexer queries, indexer scores [B, S, N])."""
    b, s, _ = x_btd.shape
    start, pos = jnp.zeros((b,), jnp.int32), jnp.broadcast_to(jnp.arange(s), (b, s))
    out, _, aux = attn(x_btd, start, None)
    inv = rope_inv_freq(attn.cfg, compressed_layer=True)
    qi, wi = attn.indexer.queries(x_btd, attn.q_norm(attn.wq_a(x_btd)), *rope_cos_sin(pos, inv), False)
    st = attn.indexer.compressor.empty_state(b, s // 4, jnp.float32)
    st, _ = attn.indexer.compressor(x_btd, pos, jnp.zeros((b, s), jnp.int32), start, st, inv, False)
    ok = jnp.arange(s // 4)[None, :] < ((jnp.arange(s) + 1) // 4)[:, None]
    return out, aux["topk"], qi, jax.vmap(index_scores, (0, 0, 0, None))(qi, wi, st["kv"], ok)


@pytest.mark.parametrize("index_head_dim,index_topk", [(64, 4), (96, 0)])
def test_indexer_layer_matches_the_official_reading(tmp_path, index_head_dim, index_topk):
    """One CSA layer: the indexer's scores over the compressed keys, its top-k entries and the attention
    output, for an indexer head with no non-RoPE dims (64 = rd), a non-power-of-two head (96: the
    official Hadamard transform zero-pads to 128) and index_topk 0 (the window alone)."""
    cfg = _config(num_nextn_predict_layers=0, num_hash_layers=0, compress_ratios=[4],
                  index_head_dim=index_head_dim, index_topk=index_topk)
    t = _write_hub(str(tmp_path), cfg, seed=index_head_dim + index_topk)
    attn = checkpoint.load_hub(str(tmp_path)).block(0).attn
    x = np.random.default_rng(3).standard_normal((2, SEQ, cfg.dim))
    p = "layers.0.attn."
    qr = R.rms(x @ t[p + "wq_a.weight"].T, t[p + "q_norm.weight"], cfg.rms_norm_eps)
    ref_score, ref_idx = R.indexer(t, p + "indexer.", cfg, x, qr)
    ref_out, _ = R.attention(t, p, cfg, x, 4)

    out, idx, qi, score = _v4_indexer_layer(attn, jnp.asarray(x, jnp.float32))
    out, idx, score = np.asarray(out), np.asarray(idx), np.asarray(score)
    assert qi.shape[-1] == index_head_dim and np.array_equal(np.isfinite(score), np.isfinite(ref_score))
    fin = np.isfinite(ref_score)
    err_score, err_out = np.abs(score[fin] - ref_score[fin]).max(), np.abs(out - ref_out).max()
    print(f"indexer head {index_head_dim}, top-{index_topk}: scores max |d| = {err_score:.2e} "
          f"(max |score| {np.abs(ref_score[fin]).max():.2f}), attention output {err_out:.2e}")
    assert err_score <= TOL and err_out <= TOL, (err_score, err_out)
    got_idx = idx
    assert got_idx.shape == ref_idx.shape == (2, SEQ, min(index_topk, SEQ // 4))
    assert all(set(got_idx[b, i]) == set(ref_idx[b, i]) for b in range(2) for i in range(SEQ))
    if index_topk:  # later queries really choose (4 of up to 10 entries)
        assert (ref_idx[:, -1] >= 0).all()


def test_hadamard_pads_like_the_official_transform():
    x = np.random.default_rng(0).standard_normal((3, 96))
    assert np.abs(np.asarray(quant.hadamard(jnp.asarray(x, jnp.float32))) - R.hadamard(x)).max() <= 1e-5
    h = quant.hadamard_matrix(64)
    np.testing.assert_allclose(h @ h, np.eye(64), atol=1e-6)  # powers of two: orthonormal, symmetric


@pytest.mark.parametrize("edits", [
    dict(index_head_dim=64), dict(head_dim=64), dict(index_topk=0), dict(hc_sinkhorn_iters=0),
    dict(swiglu_limit=-1.0), dict(num_hash_layers=5), dict(num_hash_layers=-1), dict(num_experts_per_tok=1),
    dict(o_groups=1), dict(sliding_window=1 << 20), dict(num_nextn_predict_layers=0, compress_ratios=[0]),
    dict(num_hidden_layers=0, compress_ratios=[0]), dict(index_head_dim=96),
    dict(compress_ratios=[16, 0], index_n_heads=0, index_head_dim=0, index_topk=-1),  # no CSA layer
])
def test_configs_the_official_code_runs_are_accepted(edits):
    cfg = ModelConfig.from_hub({**BASE, **edits})
    assert M.count_params(cfg)["total"] > 0  # and the model can be built


@pytest.mark.parametrize("edits,key", [
    (dict(index_head_dim=32), "index_head_dim"), (dict(qk_rope_head_dim=192), "qk_rope_head_dim"),
    (dict(qk_rope_head_dim=63), "qk_rope_head_dim"), (dict(qk_rope_head_dim=0), "qk_rope_head_dim"),
    (dict(o_groups=3), "o_groups"), (dict(o_groups=0), "o_groups"), (dict(sliding_window=0), "sliding_window"),
    (dict(index_n_heads=0), "index_n_heads"), (dict(index_topk=-1), "index_topk"),
    (dict(num_experts_per_tok=0), "num_experts_per_tok"), (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(q_lora_rank=0), "q_lora_rank"), (dict(hc_sinkhorn_iters=-1), "hc_sinkhorn_iters"),
    (dict(num_nextn_predict_layers=-1), "num_nextn_predict_layers"), (dict(compress_ratios=[-4, 0]), "compress_ratios"),
])
def test_configs_the_official_code_cannot_run_are_refused(edits, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        ModelConfig.from_hub({**BASE, **edits})
