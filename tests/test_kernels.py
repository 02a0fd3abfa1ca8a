"""CSA sparse-attention kernels (Pallas TPU / Triton, interpret mode on CPU) against the jnp path."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax import model as M
from v4jax.config import ConfigError, ModelConfig
from v4jax.kernels import sparse_gather_attention

KERNELS = ("pallas_tpu", "pallas_gpu")
SCALE = 0.3


def _inputs(seed, b=2, q=3, h=4, c=16, kw=6, n=24, k=20):
    """A batch of `b` query blocks with ragged validity; query 0 of element 0 sees only the sink."""
    r = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)  # noqa: E731
    ok = r.random((b, q, kw)) < 0.6
    idx = r.integers(0, n, size=(b, q, k))
    idx[r.random((b, q, k)) < 0.3] = -1
    ok[0, 0], idx[0, 0] = False, -1
    ok[1, 1], idx[1, 2] = True, -1  # a full window row; a query with no entry
    return f(b, q, h, c), f(b, kw, c), jnp.asarray(ok), f(b, n, c), jnp.asarray(idx, jnp.int32), f(h)


def _run(impl, block_k=8):
    """vmapped over the batch (exercises the custom_vmap folding), sink shared: -> (o, lse), grads."""
    def fn(q, win, ok, ent, idx, sink):
        one = lambda q, w, o, e, i: sparse_gather_attention(q, w, o, e, i, sink, scale=SCALE, impl=impl,  # noqa
                                                            block_k=block_k)
        return jax.vmap(one)(q, win, ok, ent, idx)

    def loss(q, win, ent, sink, ok, idx):
        o, lse = fn(q, win, ok, ent, idx, sink)
        wo = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
        return jnp.sum(o * wo) + jnp.sum(jnp.sin(lse))

    q, win, ok, ent, idx, sink = _inputs(0)
    out = jax.jit(fn)(q, win, ok, ent, idx, sink)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, win, ent, sink, ok, idx)
    return out, grads


@pytest.fixture(scope="module")
def reference():
    return _run("jnp")


@pytest.mark.parametrize("impl", KERNELS)
def test_forward_and_grads_match_jnp(reference, impl):
    (o, lse), grads = _run(impl)
    (o_ref, lse_ref), grads_ref = reference
    assert np.isfinite(np.asarray(o)).all()
    np.testing.assert_allclose(o, o_ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lse, lse_ref, atol=1e-5, rtol=0)
    # query (0, 0) sees nothing but the sink: o = 0, lse = sink
    np.testing.assert_allclose(o[0, 0], 0.0, atol=1e-7)
    np.testing.assert_allclose(lse[0, 0], _inputs(0)[-1], atol=1e-6)
    for name, g, g_ref in zip(("q", "window", "entries", "sink"), grads, grads_ref):
        assert float(jnp.abs(g_ref).max()) > 0, name
        np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=0, err_msg=name)


def test_tpu_kernel_under_strict_tpu_interpreter():
    """The Mosaic interpreter (DMA + semaphore semantics) agrees too; forward only, one sequence."""
    from jax.experimental.pallas import tpu as pltpu

    q, win, ok, ent, idx, sink = [x[0] for x in _inputs(1)[:5]] + [_inputs(1)[5]]
    got = sparse_gather_attention(q, win, ok, ent, idx, sink, scale=SCALE, impl="pallas_tpu", block_k=8,
                                  interpret=pltpu.InterpretParams())
    want = sparse_gather_attention(q, win, ok, ent, idx, sink, scale=SCALE, impl="jnp")
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("strict", [False, True])
def test_tpu_kernel_bf16_entries(strict):
    """bf16 entries are DMA'd as 32-bit word rows holding row pairs (in-kernel ref bitcast; the strict
    interpreter gets the same view built by XLA): odd N (padded), ids of both parities, 3 chunks. The
    jnp reference rounds its bf16 logits to bf16, the kernel keeps them fp32: a wrong row half would be
    off by O(1), rounding is ~1e-2."""
    from jax.experimental.pallas import tpu as pltpu

    q, win, ok, ent, idx, sink = [x[0] for x in _inputs(2, n=25)[:5]] + [_inputs(2, n=25)[5]]
    assert (np.asarray(idx) % 2 == 1).any() and (np.asarray(idx) % 2 == 0).any()
    bf = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
    got = sparse_gather_attention(bf(q), bf(win), ok, bf(ent), idx, sink, scale=SCALE, impl="pallas_tpu", block_k=8,
                                  interpret=pltpu.InterpretParams() if strict else True)
    want = sparse_gather_attention(bf(q), bf(win), ok, bf(ent), idx, sink, scale=SCALE, impl="jnp")
    assert got[0].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32), atol=2e-2, rtol=0)
    np.testing.assert_allclose(got[1], want[1], atol=2e-2, rtol=0)


def test_unknown_kernel_is_rejected():
    with pytest.raises(ConfigError, match="attention_kernel"):
        ModelConfig.tiny(attention_kernel="cuda")
    with pytest.raises(ValueError, match="impl"):
        sparse_gather_attention(*[x[0] for x in _inputs(0)[:5]], jnp.zeros(4), scale=1.0, impl="cuda")


def test_model_logits_match_jnp(loaded):
    """Tiny fixture, 64 tokens: 16 CSA entries at the end, top-k 8, so the indexer prunes."""
    m = loaded["tiny-a-bf16"]
    ids = jnp.asarray(np.random.default_rng(1).integers(2, m.cfg.vocab_size, size=(2, 64)), jnp.int32)
    g, p = nnx.split(m)
    out = {}
    for kernel in ("jnp", "pallas_tpu"):
        cfg = dataclasses.replace(m.cfg, index_topk=8, attn_block=32, attention_kernel=kernel)
        args = (p, ids, jnp.zeros((2,), jnp.int32), None)
        traced = M.forward_fn(nnx.graphdef(M.abstract(cfg)), collect=True).trace(*args)
        # CSA layers 1 and 3, each staged twice by lax.platform_dependent (interpreted for CPU, Mosaic else)
        # up to jax 0.10; jax 0.12 stages only the branch of the platform it lowers for
        assert str(traced.jaxpr).count("pallas_call") in ((2, 2 * 2) if kernel != "jnp" else (0,))
        out[kernel] = traced.lower().compile()(*args)
    topk = np.asarray(out["jnp"]["aux"][1]["topk"])
    assert topk.shape[-1] == 8 and (topk[:, -1] >= 0).all()  # 16 visible entries, 8 kept
    np.testing.assert_array_equal(np.asarray(out["pallas_tpu"]["aux"][1]["topk"]), topk)
    np.testing.assert_allclose(out["pallas_tpu"]["logits"], out["jnp"]["logits"], atol=1e-5, rtol=0)
