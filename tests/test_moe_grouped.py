"""The "grouped" MoE dispatch (v4jax/grouped_matmul.py) equals "dense" in forward and gradients, for
every grouped-matmul kernel, with ragged groups and an expert that receives no token."""
import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax import grouped_matmul
from v4jax.config import ConfigError, ModelConfig
from v4jax.moe import Experts

E, K, T, D, F = 8, 2, 37, 32, 16
EMPTY = 5  # the expert no token is routed to

HAS_MEGABLOX = importlib.util.find_spec("jax.experimental.pallas.ops.tpu.megablox") is not None


def _cfg(**kw):
    return dataclasses.replace(ModelConfig.tiny(), n_routed_experts=E, num_experts_per_tok=K, hidden_size=D,
                               moe_intermediate_size=F, **kw)


def _inputs(seed=0):
    """x [T, D], routing weights [T, K], indices [T, K]: K distinct experts per token, none is EMPTY."""
    ks = jax.random.split(jax.random.key(seed), 3)
    scores = jax.random.normal(ks[0], (T, E)).at[:, EMPTY].set(-jnp.inf)
    scores = scores + jnp.arange(E) * 0.3  # skew the loads so the groups are ragged
    _, idx = jax.lax.top_k(scores, K)
    x = jax.random.normal(ks[1], (T, D))
    r = jax.random.uniform(ks[2], (T, K), minval=0.2, maxval=1.5)
    return x, r, idx.astype(jnp.int32)


def _loss_grads(cfg, impl, x, r, idx):
    gd, state = nnx.split(Experts(cfg, nnx.Rngs(0)))
    cot = jax.random.normal(jax.random.key(9), (T, D))

    def loss(state, x, r):
        y = getattr(nnx.merge(gd, state), impl)(x, r, idx)
        return jnp.sum(y * cot), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(state, x, r)
    g_state, g_x, g_r = grads
    return y, {"x": g_x, "r": g_r, **{n: getattr(g_state, n)[...] for n in ("w1", "w2", "w3")}}


@pytest.fixture(scope="module")
def reference():
    x, r, idx = _inputs()
    counts = np.bincount(np.asarray(idx).ravel(), minlength=E)
    assert counts[EMPTY] == 0 and len(set(counts.tolist())) > 2  # an empty expert, ragged groups
    return (x, r, idx), _loss_grads(_cfg(), "dense", x, r, idx)


KERNEL_PARAMS = ["jnp", "ragged_dot",
                 pytest.param("megablox", marks=pytest.mark.skipif(
                     not HAS_MEGABLOX, reason="jax.experimental.pallas.ops.tpu.megablox is not importable"))]


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_grouped_equals_dense(reference, kernel):
    (x, r, idx), (y_ref, g_ref) = reference
    y, g = _loss_grads(_cfg(moe_kernel=kernel), "grouped", x, r, idx)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for name in g_ref:
        np.testing.assert_allclose(g[name], g_ref[name], rtol=1e-5, atol=1e-5, err_msg=name)
    assert float(jnp.abs(g["w1"][EMPTY]).max()) == 0.0  # the empty expert gets no gradient


def test_layout_tiles_hold_one_expert():
    _, _, idx = _inputs()
    for tm in (8, 16):
        lay = jax.jit(lambda i, tm=tm: {k: v for k, v in grouped_matmul.layout(i, E, tm).items() if k != "tm"})(idx)
        n = grouped_matmul.n_tiles(T * K, E, tm)
        assert lay["tok_m"].shape == (n * tm,)
        tok, tile = np.asarray(lay["tok_m"]).reshape(n, tm), np.asarray(lay["tile_n"])
        pos = np.asarray(lay["pos_a"])
        assert len(set(pos.tolist())) == T * K  # every assignment has its own row
        e_row = np.repeat(tile, tm)
        np.testing.assert_array_equal(e_row[pos], np.asarray(idx).ravel())  # each row in its expert's tile
        assert (tok[~np.asarray(lay["live_n"])] == T).all()  # unused tiles hold only padding rows


def test_grouped_qat_fp4_and_all_tokens_to_one_expert():
    x, r, _ = _inputs(1)
    idx = jnp.stack([jnp.zeros((T,), jnp.int32), jnp.ones((T,), jnp.int32)], axis=1)  # two full groups
    ex = Experts(_cfg(qat_fp4_experts=True), nnx.Rngs(1))
    np.testing.assert_allclose(ex.grouped(x, r, idx), ex.dense(x, r, idx), rtol=1e-5, atol=1e-5)


def test_auto_picks_grouped_for_many_tokens():
    ex = Experts(_cfg(), nnx.Rngs(0))
    assert ex.choose("auto", 1, K) == "gather"
    assert ex.choose("auto", E // K, K) == "grouped"
    assert ex.choose("auto", 4096, K) == "grouped"
    assert ex.choose("dense", 4096, K) == "dense"


def test_config_rejects_unknown_moe_kernel():
    assert ModelConfig.tiny(moe_kernel="megablox").moe_kernel == "megablox"
    with pytest.raises(ConfigError, match="moe_kernel.*unknown 'cuda'"):
        ModelConfig.tiny(moe_kernel="cuda")
    with pytest.raises(ValueError, match="moe_kernel"):
        grouped_matmul.gmm(jnp.zeros((8, 4)), jnp.zeros((2, 3, 4)), {"tm": 8}, "cuda")
