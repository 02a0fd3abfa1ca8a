"""mHC: the fast layout (tokens flattened, Sinkhorn tokens-minor, hand-written VJPs) equals the plain
autodiff reference in values and gradients; both match the official Sinkhorn vectors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES
from v4jax import mhc

V = np.load(f"{FIXTURES}/quant_vectors.npz")


@pytest.mark.parametrize("reference", [False, True])
def test_sinkhorn_matches_official_vectors(reference):
    pre, post, comb = mhc.sinkhorn_split(jnp.asarray(V["sinkhorn_mixes"]), jnp.asarray(V["sinkhorn_scale"]),
                                         jnp.asarray(V["sinkhorn_base"]), 4, int(V["sinkhorn_iters"]),
                                         float(V["sinkhorn_eps"]), reference=reference)
    for got, key in ((pre, "pre"), (post, "post"), (comb, "comb")):
        assert got.shape == V[f"sinkhorn_{key}"].shape
        assert np.abs(np.asarray(got) - V[f"sinkhorn_{key}"]).max() <= 1e-6
    c = np.asarray(comb)  # doubly stochastic after 20 iterations
    np.testing.assert_allclose(c.sum(-2), 1.0, atol=1e-5)
    np.testing.assert_allclose(c.sum(-1), 1.0, atol=0.05)  # rows converge more slowly


def _inputs(b, t, n=4, d=16):
    k = jax.random.split(jax.random.key(3), 6)
    x = jax.random.normal(k[0], (b, t, n, d))
    fn = 0.3 * jax.random.normal(k[1], ((2 + n) * n, n * d))
    scale = jnp.array([0.7, 0.9, 1.3])
    base = 0.5 * jax.random.normal(k[2], ((2 + n) * n,))
    f = jax.random.normal(k[3], (b, t, d))
    probe = jax.random.normal(k[4], (b, t, n, d))
    return x, fn, scale, base, f, probe


@pytest.mark.parametrize("b,t", [(1, 7), (3, 5)])
def test_fast_mhc_equals_reference_values_and_gradients(b, t):
    x, fn, scale, base, f, probe = _inputs(b, t)

    def loss(reference, x, fn, scale, base, f):
        y, post, comb = mhc.hc_pre(x, fn, scale, base, iters=20, hc_eps=1e-6, norm_eps=1e-6, reference=reference)
        out = mhc.hc_post(f * jnp.tanh(y), x, post, comb, reference=reference)
        return jnp.sum(out * probe), (y, out)

    (lf, (yf, of)), gf = jax.value_and_grad(lambda *a: loss(False, *a), argnums=range(5), has_aux=True)(
        x, fn, scale, base, f)
    (lr, (yr, orf)), gr = jax.value_and_grad(lambda *a: loss(True, *a), argnums=range(5), has_aux=True)(
        x, fn, scale, base, f)
    assert yf.shape == (b, t, 16) and of.shape == (b, t, 4, 16)
    np.testing.assert_allclose(yf, yr, atol=1e-5)
    np.testing.assert_allclose(of, orf, atol=1e-5)
    for a, r in zip(gf, gr):
        assert a.shape == r.shape
        assert float(jnp.max(jnp.abs(a - r))) <= 1e-4 * max(1.0, float(jnp.max(jnp.abs(r))))
    assert float(jnp.max(jnp.abs(gr[1]))) > 0  # the probe reaches fn through Sinkhorn and pre


def test_head_collapse_gradient():
    x, fn, scale, base, _, _ = _inputs(2, 3)
    fn_h = fn[:4]

    def ref(x, fn_h):
        mixes, xf = mhc.hc_mixes(x, fn_h, 1e-6)
        w = jax.nn.sigmoid(mixes * 0.5 + 0.1) + 1e-6
        return jnp.sum(jnp.sin(jnp.sum(w[..., None] * xf.reshape(x.shape), axis=2)))

    def fast(x, fn_h):
        return jnp.sum(jnp.sin(mhc.hc_head(x, fn_h, 0.5, 0.1, hc_eps=1e-6, norm_eps=1e-6)))

    np.testing.assert_allclose(fast(x, fn_h), ref(x, fn_h), rtol=1e-6)
    for a, r in zip(jax.grad(fast, (0, 1))(x, fn_h), jax.grad(ref, (0, 1))(x, fn_h)):
        np.testing.assert_allclose(a, r, atol=1e-5)
