"""Run-configuration training options: straight-through fake quantisation (QAT), gradient accumulation
and sequence-length stages. One-layer configs and one shared training run keep the compiled programs
few and small (compiling them is most of this file's time)."""
import copy
import dataclasses
import functools
import json
import os
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import FIXTURES
from v4jax import data as D
from v4jax import layers, moe, quant
from v4jax import model as M
from v4jax import training as T
from v4jax.config import ConfigError, ModelConfig
from v4jax.sharding import batch_sharding
from v4jax.data import StagedBatches
from v4jax.trainer import RunConfig, Trainer, parse_qat, parse_seq_stages

QAT_ALL = "fp8_linear,fp4_experts,fp4_indexer"
# The train steps here run a few times each: XLA's CPU backend compiles them about twice as fast unoptimised.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "make_train_step", functools.partial(T.make_train_step, compiler_options=FAST_COMPILE))
        yield


def _config(tmp_path_factory, **kw) -> str:
    """train-tiny cut down to one score-routed layer (compile time is what these tests cost)."""
    raw = json.load(open(os.path.join(FIXTURES, "train-tiny.json")))
    raw.update(num_hidden_layers=1, num_hash_layers=0, sliding_window=16, index_topk=4, **kw)
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    json.dump(raw, open(path, "w"))
    return str(path)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One CSA layer (compressor, indexer; alignment 4) and its MTP block."""
    return _config(tmp_path_factory, compress_ratios=[4, 0])


@pytest.fixture(scope="module")
def small_csa(tmp_path_factory):
    """One CSA layer, no MTP: every QAT path (FP8 KV, FP4 indexer q/k), cheap to compile."""
    return _config(tmp_path_factory, compress_ratios=[4], num_nextn_predict_layers=0)


def _bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


# ------------------------------------------------------------------ fake quantisation
def test_straight_through_gradient_is_identity():
    x = 3.0 * jax.random.normal(jax.random.key(0), (2, 136, 200))
    c = jax.random.normal(jax.random.key(1), x.shape)
    fns = {"fp8_sim": lambda v: quant.fp8_sim(v, 8), "fp4_sim": lambda v: quant.fp4_sim(v, 8),
           "fp8_act": quant.fp8_act_fake, "fp8_weight": quant.fp8_weight_fake, "fp4_weight": quant.fp4_weight_fake}

    @jax.jit
    def values_and_grads(x, c):
        return {k: (f(x), jax.grad(lambda v: jnp.sum(f(v) * c))(x)) for k, f in fns.items()}

    for name, (y, g) in values_and_grads(x, c).items():
        assert np.abs(np.asarray(y) - np.asarray(x)).max() > 1e-3, name  # it does quantise
        np.testing.assert_array_equal(np.asarray(g), np.asarray(c), err_msg=name)
    # the STE wrapper leaves the forward bit-exact (tests/test_quant.py checks it against the official kernels)
    np.testing.assert_array_equal(_bits(values_and_grads(x, c)["fp8_sim"][0]),
                                  _bits(quant.fp8_sim(x, 8, return_scale=True)[0]))


def test_fake_quant_decodes_bit_identically_with_the_checkpoint_formats():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((200, 300)) * np.exp(rng.standard_normal((200, 1)))).astype(np.float32)  # partial blocks
    experts = (0.02 * rng.standard_normal((4, 128, 256))).astype(np.float32)
    x = (rng.standard_normal((3, 256)) * 5).astype(np.float32)

    @jax.jit
    def run(w, experts, x):
        e4 = quant.fp4_weight_fake(experts)
        return {"fp8": quant.fp8_weight_fake(w, return_scale=True), "fp4": quant.fp4_weight_fake(w, return_scale=True),
                "e4": e4, "e4_fp8": quant.fp8_weight_fake(e4),
                "act": quant.fp8_act_fake(x), "act_ref": quant.fp8_sim(x, 128),
                "act_part": quant.fp8_act_fake(x[:, :200]),
                "act_part_ref": quant.fp8_sim(jnp.pad(x[:, :200], ((0, 0), (0, 56))), 128)[:, :200]}

    r = run(w, experts, x)
    y, q, s = r["fp8"]
    assert s.shape == (2, 3)
    dec = quant.dequant_fp8_weight(np.asarray(q).view(np.uint8), quant.e8m0_bytes(s))
    np.testing.assert_array_equal(_bits(y), _bits(dec))
    y4, q4, s4 = r["fp4"]
    assert s4.shape == (200, 10)
    dec4 = quant.dequant_fp4_weight(quant.pack_fp4(np.asarray(q4, np.float32)), quant.e8m0_bytes(s4))
    np.testing.assert_array_equal(_bits(y4), _bits(dec4))
    # MXFP4 values are exactly representable in FP8 128x128 blocks (the paper's lossless FP4 -> FP8 cast)
    np.testing.assert_array_equal(_bits(r["e4_fp8"]), _bits(r["e4"]))
    # activations: the official act_quant (1 x 128 along K); a partial block has its own scale
    np.testing.assert_array_equal(_bits(r["act"]), _bits(r["act_ref"]))
    np.testing.assert_array_equal(_bits(r["act_part"]), _bits(r["act_part_ref"]))


def test_fp8_linear_forward_is_the_dequantised_matmul(small):
    cfg = ModelConfig.from_hub(small, qat_fp8_linear=True)
    graphdef, state = nnx.split(layers.Linear(cfg, 200, 136, ("q_lora", "embed"), layers.Keys(0)))
    x = jax.random.normal(jax.random.key(2), (2, 5, 200))

    @jax.jit
    def run(state, x):
        lin = nnx.merge(graphdef, state)
        xq = quant.fp8_sim(jnp.pad(x, ((0, 0), (0, 0), (0, 56))), 128)[..., :200]
        return lin(x), xq, quant.fp8_weight_fake(lin.weight[...], return_scale=True), layers.dense(x, lin.weight[...])

    got, xq, (_, codes, scale), plain = run(state, x)
    w = quant.dequant_fp8_weight(np.asarray(codes).view(np.uint8), quant.e8m0_bytes(scale))
    want = np.einsum("btk,nk->btn", np.asarray(xq, np.float64), w.astype(np.float64))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(got) - np.asarray(plain)).max() > 1e-4
    # which projections take part (spec §10): not the compressors' wkv/wgate, not the indexer's weights_proj
    m = M.abstract(cfg)
    attn = m.block(0).attn
    assert attn.wq_a.qat_fp8 and attn.wkv.qat_fp8 and attn.wo_b.qat_fp8 and attn.indexer.wq_b.qat_fp8
    assert m.block(0).ffn.shared_experts.w1.qat_fp8 and m.mtp[0].e_proj.qat_fp8
    assert not (attn.compressor.wkv.qat_fp8 or attn.compressor.wgate.qat_fp8 or attn.indexer.weights_proj.qat_fp8)
    assert not M.abstract(ModelConfig.from_hub(small)).block(0).attn.wq_a.qat_fp8


def test_fp4_experts_forward_uses_the_mxfp4_weights(small):
    cfg = ModelConfig.from_hub(small, qat_fp4_experts=True)
    graphdef, state = nnx.split(moe.Experts(cfg, layers.Keys(0)))
    plain, decoded = nnx.split(moe.Experts(dataclasses.replace(cfg, qat_fp4_experts=False), layers.Keys(0)))
    for name in ("w1", "w2", "w3"):
        w = state[name][...]
        _, q, s = quant.fp4_weight_fake(w, return_scale=True)
        packed = quant.pack_fp4(np.asarray(q, np.float32).reshape(-1, w.shape[-1]))
        dec = quant.dequant_fp4_weight(packed, quant.e8m0_bytes(s).reshape(-1, s.shape[-1]))
        decoded[name][...] = jnp.asarray(dec.reshape(w.shape))
    x = jax.random.normal(jax.random.key(3), (6, cfg.dim))
    idx = jnp.asarray(np.random.default_rng(1).integers(0, cfg.n_routed_experts, (6, 2)), jnp.int32)
    wk = jnp.full((6, 2), 0.5, jnp.float32)

    @jax.jit
    def both(state, decoded):
        ex, ref = nnx.merge(graphdef, state), nnx.merge(plain, decoded)
        return [(getattr(ex, i)(x, wk, idx), getattr(ref, i)(x, wk, idx)) for i in ("dense", "gather")]

    for got, want in both(state, decoded):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    unquantised = both(state, state)[0][1]
    assert np.abs(np.asarray(unquantised) - np.asarray(both(state, decoded)[0][0])).max() > 1e-4


# ------------------------------------------------------------------ gradient accumulation
def _packed_rows(rows, s, seed):
    """Rows of random documents with EOS padding: the micro-batches hold different numbers of targets."""
    rng = np.random.default_rng(seed)
    tok = rng.integers(D.BYTE_BASE, D.BYTE_BASE + 256, (rows, s)).astype(np.int32)
    seg, pos = np.zeros_like(tok), np.zeros_like(tok)
    for r in range(rows):
        cuts = np.sort(rng.choice(np.arange(4, s, 4), size=r % 3, replace=False))
        for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, s])):
            seg[r, a:b], pos[r, a:b] = i + 1, np.arange(b - a)
            tok[r, a] = 0
            pad = int(rng.integers(0, 3)) * 4 if b - a > 12 else 0
            tok[r, b - pad - 1:b] = 1  # EOS, then EOS alignment padding
    return {"tokens": tok, "segment_ids": seg, "positions": pos}


class _LossStub:
    """What `compute_loss` reads of a model, computed from the tokens alone: logits, MTP logits, routing
    and a per-row indexer KL (the attention's mean over rows), one score-routed main layer + MTP block."""

    def __init__(self, vocab=300, experts=8, k=2):
        self.cfg = SimpleNamespace(num_hidden_layers=1, n_mtp=1, n_routed_experts=experts, num_experts_per_tok=k)
        block = SimpleNamespace(ffn=SimpleNamespace(gate=SimpleNamespace(is_hash=False)))
        self.stack, self.mtp = [[block]], [block]  # one segment of one slot with one row
        rng = np.random.default_rng(7)
        self.emb, self.emb2, self.route = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                                           for s in ((vocab, vocab), (vocab, vocab), (vocab, experts)))
        self.kl = jnp.asarray(rng.uniform(size=vocab), jnp.float32)

    def _aux(self, tok):
        scores = jax.nn.softplus(self.route[tok])
        return {"idx": jax.lax.top_k(scores, self.cfg.num_experts_per_tok)[1], "scores": scores,
                "indexer_kl": jnp.mean(jnp.mean(self.kl[tok], axis=1))}

    def __call__(self, tok, positions, segment_ids, stale_routers):
        aux = self._aux(tok)
        return {"logits": self.emb[tok], "streams": self.emb2[tok], "aux": [aux],
                "aux_stacked": [[jax.tree.map(lambda a: a[None], aux)]]}

    def mtp_logits(self, streams, nxt, positions, segment_ids, stale_router):
        return streams + self.emb[nxt], None, self._aux(nxt)


def test_micro_batch_losses_sum_to_the_batch_losses():
    """Every term (CE and MTP over their targets, the per-row balance and indexer-KL means, the counts)."""
    model, lcfg = _LossStub(), T.LossConfig(eos_id=1)

    @jax.jit
    def run(batch):
        norm = T.micro_norm(batch, lcfg.eos_id, 2)
        micro = [jax.tree.map(lambda x: x[a], T.split_micro(batch, 2)) for a in range(2)]
        parts = [T.compute_loss(model, mb, lcfg, 0.3, None, norm) for mb in micro]
        own_means = [a["ce"] * norm["ce"] / jnp.sum(T.target_masks(mb, 1)[0]) for (_, a), mb in zip(parts, micro)]
        return T.compute_loss(model, batch, lcfg, 0.3), parts, own_means

    (whole, aux), parts, means = run({k: jnp.asarray(v) for k, v in _packed_rows(4, 24, 1).items()})
    np.testing.assert_allclose(sum(float(p[0]) for p in parts), float(whole), rtol=1e-6)
    for k in ("ce", "mtp", "balance", "indexer_kl"):
        np.testing.assert_allclose(sum(float(p[1][k]) for p in parts), float(aux[k]), rtol=1e-6, err_msg=k)
    for i, c in enumerate(aux["counts"]):
        np.testing.assert_array_equal(sum(np.asarray(p[1]["counts"][i]) for p in parts), np.asarray(c))
    assert abs(np.mean(means) - float(aux["ce"])) > 1e-3  # a plain mean of micro-batch means would be wrong


# ------------------------------------------------------------------ sequence-length stages
def test_staged_batches_join_to_the_longer_packing(tmp_path):
    rng = np.random.default_rng(0)
    with open(tmp_path / "docs.jsonl", "w") as f:
        for _ in range(300):
            f.write(json.dumps({"text": "ab" * int(rng.integers(1, 40))}) + "\n")
    src, tok = [str(tmp_path / "docs.jsonl")], D.load_tokenizer(None)
    staged = StagedBatches(src, tok, 3, [16, 64], 0, align=4)
    direct = D.PackedBatches(src, tok, 3, 64, 0, align=4)
    for _ in range(4):  # 4 x 16 rows joined == rows packed at 64 (segments and positions included)
        got, want = staged.take(64), next(direct)
        assert got["segment_ids"].max() >= 2 and (got["positions"][:, 16:] > 16).any()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # the state is the one stream's: a copy restored from it continues identically, in any stage
    staged.take(16)
    state = json.loads(json.dumps(staged.get_state()))
    other = StagedBatches(src, tok, 3, [16, 64], 0, align=4)
    other.set_state(state)
    for s in (16, 64):
        a, b = staged.take(s), other.take(s)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    # host split: every host keeps rows process_index::process_count of the same global batch
    hosts = [StagedBatches(src, tok, 1, [16, 64], 0, p, 3, align=4) for p in range(3)]
    full = StagedBatches(src, tok, 3, [16, 64], 0, align=4).take(64)
    for p, h in enumerate(hosts):
        np.testing.assert_array_equal(h.take(64)["tokens"], full["tokens"][p::3])


def test_run_settings_parse_and_are_checked(small):
    rc = RunConfig.load(None, ["grad_accum=4", "seq_stages=128:40,256", f"qat={QAT_ALL}"])
    assert (rc.grad_accum, rc.seq_stages, rc.qat) == (4, "128:40,256", QAT_ALL)
    assert parse_seq_stages("128:40,256", 100) == [(128, 40), (256, 100)]
    assert parse_seq_stages("64", 10) == [(64, 10)]
    for bad in ("128,256", "128:40,256:30", "x:4", "0:3,8"):
        with pytest.raises(ValueError, match="seq_stages"):
            parse_seq_stages(bad, 100)
    assert parse_qat("fp8_linear, fp4_indexer") == {"qat_fp8_linear": True, "qat_sim": True}
    assert parse_qat("") == {}
    with pytest.raises(ValueError, match="unknown option 'fp4'"):
        parse_qat("fp4")
    with pytest.raises(ValueError, match="seq_len 30 must be a multiple of 4"):
        Trainer(RunConfig(config=small, seq_stages="16:2,30", out="unused"))
    with pytest.raises(ValueError, match="grad_accum"):
        Trainer(RunConfig(config=small, grad_accum=0, out="unused"))
    rc = RunConfig.load(None, ["attention_kernel=pallas_gpu", "moe_impl=grouped", "moe_kernel=ragged_dot"])
    assert (rc.attention_kernel, rc.moe_impl, rc.moe_kernel) == ("pallas_gpu", "grouped", "ragged_dot")
    with pytest.raises(ConfigError, match="moe_kernel.*unknown 'gmm'"):
        Trainer(RunConfig(config=small, moe_kernel="gmm", out="unused"))


def _rc(config, out, **kw):
    return RunConfig(config=config, batch=2, warmup=2, lr=3e-3, out=str(out), log_every=1000, data_max_bytes=200_000,
                   spike_detect=False, **kw)


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f]


@pytest.fixture(scope="module")
def staged_run(small_csa, tmp_path_factory):
    """8 steps: sequence length 16 for 3, then 32; 2 micro-batches per step; every QAT option on."""
    out = tmp_path_factory.mktemp("staged")
    tr = Trainer(_rc(small_csa, out, steps=8, save_every=5, seq_stages="16:3,32", grad_accum=2, qat=QAT_ALL))
    tr.run(log=lambda s: None)
    return out, tr


def test_stages_accumulation_and_qat_train(staged_run):
    out, tr = staged_run
    recs = _metrics(out)
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert [r["seq_len"] for r in recs] == [16] * 3 + [32] * 5
    assert tr.cfg.qat_fp8_linear and tr.cfg.qat_fp4_experts and tr.cfg.qat_sim
    ce = [r["ce"] for r in recs]
    assert all(np.isfinite(ce)) and max(ce[-2:]) < ce[0] - 0.3, ce


def test_resume_inside_the_second_stage_reproduces_the_losses(staged_run, small_csa, tmp_path):
    out0, tr0 = staged_run
    out = tmp_path / "resumed"
    shutil.copytree(out0, out)
    shutil.rmtree(out / "8")  # the run "died" after step 7; its latest checkpoint is step 5 (stage 2)
    tr = Trainer(_rc(small_csa, out, steps=8, save_every=5, seq_stages="16:3,32", grad_accum=2, qat=QAT_ALL))
    tr._step_fns = tr0._step_fns  # same programs: skip compiling them again
    log = []
    tr.run(log=log.append)
    assert "resumed from" in log[0] and "at step 5" in log[0]
    assert [r["loss"] for r in _metrics(out)] == [r["loss"] for r in _metrics(out0)]


def test_grad_accum_equals_one_big_batch(staged_run):
    """The staged run's step (2 micro-batches of 2 rows: Muon, QAT, anticipatory-routing ring) == the
    same trainer's step on the 4 rows at once, from its final state (learning rate > 0)."""
    tr = staged_run[1]
    one = copy.copy(tr)
    one.rc, one._step_fns = dataclasses.replace(tr.rc, grad_accum=1), {}
    # placed like the trainer's own batches, so that the run's compiled stage-2 step is reused
    batch = {k: jax.device_put(v, batch_sharding(tr.mesh, v.shape)) for k, v in _packed_rows(4, 32, 0).items()}
    nxt, _ = T.target_masks(batch, 1)
    assert int(nxt[0::2].sum()) != int(nxt[1::2].sum())  # unequal micro-batches: the normalisation matters
    ts0 = jax.tree.map(jnp.copy, tr.ts)
    out = {accum: t.step_fn("")(jax.tree.map(jnp.copy, ts0), batch, jnp.asarray(False))
           for accum, t in ((1, one), (2, tr))}
    (a, ma), (b, mb) = out[1], out[2]
    for k in ("loss", "ce", "balance", "grad_norm"):
        np.testing.assert_allclose(float(mb[k]), float(ma[k]), rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(np.asarray(mb["max_load_ratio"]), np.asarray(ma["max_load_ratio"]), rtol=1e-6)
    assert int(a["step"]) == int(b["step"]) == int(ts0["step"]) + 1
    p0, pa, pb = (nnx.to_flat_state(t) for t in (ts0["params"], a["params"], b["params"]))
    diff2 = upd2 = norm2 = 0.0
    for (path, v0), (_, va), (_, vb) in zip(p0, pa, pb):
        va, vb, v0 = np.asarray(va[...], np.float64), np.asarray(vb[...], np.float64), np.asarray(v0[...], np.float64)
        d, u = np.linalg.norm(vb - va), np.linalg.norm(va - v0)
        # per tensor, the update agrees to 1e-2 of its size (the loosest are tensors whose gradients
        # nearly cancel over the batch, like the final hc_head's: summation order shows at ~1e-3 there)
        assert d <= 1e-2 * u + 1e-12, (path, d, u)
        diff2, upd2, norm2 = diff2 + d ** 2, upd2 + u ** 2, norm2 + np.linalg.norm(va) ** 2
    assert diff2 ** 0.5 <= 1e-5 * norm2 ** 0.5  # parameters after the step
    # the whole update: Muon's Newton-Schulz amplifies float summation noise, and the grouped MoE dispatch
    # sums expert gradients tile by tile in an order that depends on the micro-batch (2e-4 measured; a
    # wrong micro-batch normalisation is O(1))
    assert diff2 ** 0.5 <= 5e-4 * upd2 ** 0.5
    # the balancing biases moved once (by +-gamma), from the expert counts of both micro-batches
    for (path, va), (_, vb), (_, v0) in zip(*(nnx.to_flat_state(t["rest"]) for t in (a, b, ts0))):
        np.testing.assert_array_equal(np.asarray(vb[...]), np.asarray(va[...]), err_msg=str(path))
        if "bias" in str(path):
            moved = np.abs(np.asarray(vb[...]) - np.asarray(v0[...]))
            assert moved.max() > 0 and np.allclose(moved[moved > 0], tr.rc.bias_gamma), (path, moved)
    for (wa, ba), (wb, bb) in zip(a["router_ring"], b["router_ring"]):
        np.testing.assert_allclose(np.asarray(wb), np.asarray(wa), rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(bb), np.asarray(ba))
