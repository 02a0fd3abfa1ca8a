"""Sparse by construction: the compiled full-sequence forward of the tiny config holds no S x S or
S x S/m buffer, and its temporary memory grows linearly with S (compiled only, nothing allocated)."""
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from v4jax import model as M
from v4jax.config import ModelConfig

SHAPE = re.compile(r"\b(?:f|bf|s|u|pred)(?:\d+)?\[([\d,]+)\]")


@pytest.fixture(scope="module")
def compiled():
    cfg = ModelConfig.tiny()
    g, p = nnx.split(M.abstract(cfg))

    def fwd(params, ids):
        return nnx.merge(g, params)(ids)["logits"]

    out = {}
    for s in (8192, 12288, 16384):
        c = jax.jit(fwd).lower(p, jax.ShapeDtypeStruct((1, s), jnp.int32)).compile()
        dims = [tuple(int(x) for x in m.split(",")) for m in set(SHAPE.findall(c.as_text())) if m]
        out[s] = (c.memory_analysis().temp_size_in_bytes, dims)
    return cfg, out


def test_temp_memory_grows_linearly(compiled):
    _, out = compiled
    ratio = out[16384][0] / out[8192][0]
    print(f"compiled temp memory: S=8192 {out[8192][0] / 2**20:.1f} MiB, S=16384 {out[16384][0] / 2**20:.1f} MiB, "
          f"ratio {ratio:.3f} (linear 2, quadratic 4)")
    assert ratio < 2.3, ratio


def test_no_quadratic_buffer(compiled):
    cfg, out = compiled
    ratios = sorted({r for r in cfg.compress_ratios if r} | {1})
    widths = {int(d) for _, v in nnx.to_flat_state(nnx.state(M.abstract(cfg))) for d in v.shape}
    checked = 0
    for s, (_, shapes) in out.items():
        # S/m values equal to a model width (e.g. vocab 512 = 8192/16) are ambiguous at that S;
        # S = 12288 has none, so every ratio is checked at least there
        for m in [m for m in ratios if s // m not in widths]:
            checked += 1
            for dims in shapes:
                rest = list(dims)
                if s in rest:
                    rest.remove(s)
                    assert s // m not in rest, f"S={s}: buffer {list(dims)} pairs S with S/{m}"
    assert checked >= len(ratios) * 2
    # and the largest single buffer doubles, not quadruples, when S doubles
    largest = {s: max(int(jnp.prod(jnp.array(d))) for d in shapes) for s, (_, shapes) in out.items()}
    assert largest[16384] <= 2 * largest[8192], largest


def test_training_memory_grows_linearly():
    """The backward too: attention blocks are rematerialised, so no block's probabilities are kept for
    the backward (keeping them costs T x N/m per head in HCA layers: 2.17x per doubling at 8K -> 16K)."""
    cfg = ModelConfig.tiny()
    g, params, rest = nnx.split(M.abstract(cfg), nnx.Param, ...)

    def loss(params, rest, ids):
        return jnp.mean(nnx.merge(g, params, rest)(ids)["logits"].astype(jnp.float32) ** 2)

    temp = {}
    for s in (8192, 16384):
        c = jax.jit(jax.grad(loss)).lower(params, rest, jax.ShapeDtypeStruct((1, s), jnp.int32)).compile()
        temp[s] = c.memory_analysis().temp_size_in_bytes
    ratio = temp[16384] / temp[8192]
    print(f"fwd+bwd temp memory: S=8192 {temp[8192] / 2**20:.0f} MiB, S=16384 {temp[16384] / 2**20:.0f} MiB, "
          f"ratio {ratio:.3f}")
    assert ratio < 2.08, ratio


def test_indexer_scores_are_blocked_over_keys(monkeypatch):
    """The indexer's [keys, Q, H] products exist one key block at a time: at N = 65,536 compressed
    entries (256K tokens) a 128-query block compiles to temporaries of a few [N, Q] score rows, not the
    2 GiB of all products; blocked scores equal unblocked ones."""
    from v4jax import attention as A

    n, nq, h, d = 1 << 16, 128, 64, 128
    sds = jax.ShapeDtypeStruct
    args = (sds((nq, h, d), jnp.bfloat16), sds((nq, h), jnp.float32), sds((n, d), jnp.bfloat16), sds((nq, n), bool))
    def temp():
        fresh = lambda *a: A.index_scores(*a)  # noqa: E731 - a new function: no cached trace
        return jax.jit(fresh).lower(*args).compile().memory_analysis().temp_size_in_bytes

    blocked, products = temp(), n * nq * h * 4
    with monkeypatch.context() as mp:
        mp.setattr(A, "INDEX_SLAB", products)  # one block: every product at once
        unblocked = temp()
    print(f"indexer, N={n}, Q={nq}, H={h}: compiled temp {blocked / 2**20:.0f} MiB in blocks of "
          f"{A._key_block(n, nq * h)} keys, {unblocked / 2**20:.0f} MiB unblocked (products {products / 2**20:.0f} MiB)")
    assert A._key_block(n, nq * h) == A.INDEX_SLAB // (nq * h) == 4096
    assert unblocked >= products and blocked < products // 4

    k = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(k[0], (2, 16, 4, 32))
    w = jax.random.normal(k[1], (2, 16, 4))
    keys = jax.random.normal(k[2], (2, 1024, 32))
    ok = jax.random.bernoulli(k[3], 0.7, (2, 16, 1024))
    full = jax.vmap(A.index_scores)(q, w, keys, ok)
    monkeypatch.setattr(A, "INDEX_SLAB", 128 * 16 * 4)  # 128-key blocks
    assert A._key_block(1024, 16 * 4) == 128
    blocked = jax.jit(jax.vmap(A.index_scores))(q, w, keys, ok)
    assert jnp.array_equal(jnp.isfinite(full), jnp.isfinite(blocked)) and (~jnp.isfinite(full)).any()
    assert float(jnp.max(jnp.abs(jnp.where(jnp.isfinite(full), full - blocked, 0.0)))) <= 1e-5
