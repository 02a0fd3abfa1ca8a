"""v4jax.optim: Muon (per matrix / per expert slice) against a float64 numpy reference, AdamW group,
role-based labels, the LR schedule, Newton-Schulz quality and gradient accumulation."""
import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from v4jax import optim
from v4jax.optim import OptimConfig

ISV = lambda x: isinstance(x, nnx.Variable)


def muon_reference_numpy(W, G, M, lr, cfg: OptimConfig):
    """One DeepSeek-V4 Muon step on one matrix W [n, m], float64: returns (W_new, M_new)."""
    W, G, M = (np.asarray(a, np.float64) for a in (W, G, M))
    mu = cfg.muon_momentum
    M_new = mu * M + G
    U = mu * M_new + G if cfg.nesterov else M_new
    n, m = W.shape
    X = U.T if n > m else U
    X = X / (np.linalg.norm(X) + optim.NS_EPS)
    for a, b, c in cfg.ns_coeffs:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    if n > m:
        X = X.T
    O = X * np.sqrt(max(n, m)) * cfg.update_rms
    return W - lr * (O + cfg.weight_decay * W), M_new


class Params(nnx.Module):
    def __init__(self, **arrays_and_roles):
        for name, (arr, role) in arrays_and_roles.items():
            axes = tuple(f"d{i}" for i in range(np.ndim(arr)))
            meta = {} if role is None else {"role": role}
            setattr(self, name, nnx.Param(jnp.asarray(arr, jnp.float32), axes=axes, **meta))


def state_of(**arrays_and_roles):
    return nnx.state(Params(**arrays_and_roles), nnx.Param)


def cfg_for_test(**kw):
    base = dict(peak_lr=0.02, warmup_steps=0, total_steps=10, clip_norm=1e9)
    return OptimConfig(**{**base, **kw})


def run_steps(tx, params, grads_list):
    """Apply tx for each grads State; returns the list of parameter States after each update."""
    opt_state = tx.init(params)
    step = jax.jit(lambda p, s, g: (lambda u, s2: (optax.apply_updates(p, u), s2))(*tx.update(g, s, p)))
    out = []
    for g in grads_list:
        params, opt_state = step(params, opt_state, g)
        out.append(params)
    return out


def arr(state, name):
    return np.asarray(state[name][...])


@pytest.mark.parametrize("shape", [(6, 10), (12, 5)], ids=["wide", "tall"])
def test_muon_matrix_matches_reference(shape):
    rng = np.random.default_rng(0)
    cfg = cfg_for_test()
    W0 = rng.normal(size=shape)
    G = [rng.normal(size=shape) for _ in range(2)]
    params = state_of(w=(W0, "matrix"))
    tx = optim.make_optimizer(params, cfg)
    got = run_steps(tx, params, [state_of(w=(g, "matrix")) for g in G])
    sched = optim.lr_schedule(cfg)
    W, M = W0, np.zeros(shape)
    for t in range(2):
        W_prev = W
        W, M = muon_reference_numpy(W, G[t], M, float(sched(t)), cfg)
        np.testing.assert_allclose(arr(got[t], "w"), W, rtol=1e-4, atol=1e-6)
        # the step itself (not just W) is reproduced
        upd = arr(got[t], "w") - (W0 if t == 0 else arr(got[t - 1], "w"))
        np.testing.assert_allclose(upd, W - W_prev, rtol=1e-3, atol=2e-6)
        assert np.abs(W - W_prev).max() > 1e-3


def test_muon_expert_stack_per_slice():
    rng = np.random.default_rng(1)
    cfg = cfg_for_test()
    E, n, m = 3, 4, 7
    W0 = rng.normal(size=(E, n, m))
    G = [rng.normal(size=(E, n, m)) * np.array([1.0, 10.0, 0.1])[:, None, None] for _ in range(2)]
    params = state_of(e=(W0, "expert"))
    got = run_steps(optim.make_optimizer(params, cfg), params, [state_of(e=(g, "expert")) for g in G])
    sched = optim.lr_schedule(cfg)
    ref = []
    for i in range(E):
        W, M = W0[i], np.zeros((n, m))
        for t in range(2):
            W, M = muon_reference_numpy(W, G[t][i], M, float(sched(t)), cfg)
        ref.append(W)
    ref = np.stack(ref)
    np.testing.assert_allclose(arr(got[1], "e"), ref, rtol=1e-4, atol=1e-6)
    # orthogonalising the flattened [E*n, m] tensor is a different (wrong) update
    Wf, Mf = W0.reshape(E * n, m), np.zeros((E * n, m))
    for t in range(2):
        Wf, Mf = muon_reference_numpy(Wf, G[t].reshape(E * n, m), Mf, float(sched(t)), cfg)
    assert np.abs(Wf.reshape(E, n, m) - ref).max() > 1e-3


def test_adam_group_matches_optax_adamw():
    rng = np.random.default_rng(2)
    cfg = cfg_for_test(warmup_steps=2, total_steps=20)
    v0, e0 = rng.normal(size=(8,)), rng.normal(size=(16, 8))
    params = state_of(norm=(v0, "vector"), emb=(e0, "embed"), w=(rng.normal(size=(8, 8)), "matrix"))
    grads = [state_of(norm=(rng.normal(size=(8,)), "vector"), emb=(rng.normal(size=(16, 8)), "embed"),
                      w=(rng.normal(size=(8, 8)), "matrix")) for _ in range(3)]
    got = run_steps(optim.make_optimizer(params, cfg), params, grads)
    adam = optax.adamw(optim.lr_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                       weight_decay=cfg.adam_weight_decay)
    p = {"norm": jnp.asarray(v0, jnp.float32), "emb": jnp.asarray(e0, jnp.float32)}
    s = adam.init(p)
    for t, g in enumerate(grads):
        u, s = adam.update({k: g[k][...] for k in p}, s, p)
        p = optax.apply_updates(p, u)
        for k in p:
            np.testing.assert_allclose(arr(got[t], k), np.asarray(p[k]), rtol=1e-6, atol=1e-7)


def test_labels_from_roles():
    params = state_of(wq=(np.zeros((4, 4)), "vector"), wo=(np.zeros((4, 4)), "matrix"),
                      experts=(np.zeros((2, 4, 4)), "expert"), embed=(np.zeros((9, 4)), "embed"),
                      head=(np.zeros((9, 4)), "head"))
    labels = optim.labels_from_roles(params)
    assert dict(labels) == {"wq": "adam", "wo": "muon", "experts": "muon", "embed": "adam", "head": "adam"}

    class Nested(nnx.Module):
        def __init__(self):
            self.block = Params(ok=(np.zeros((2, 2)), "matrix"), attn_sink=(np.zeros((2,)), None))

    with pytest.raises(ValueError, match="block/attn_sink"):
        optim.labels_from_roles(nnx.state(Nested(), nnx.Param))
    with pytest.raises(ValueError, match="'w'.*'bogus'"):
        optim.labels_from_roles(state_of(w=(np.zeros((2, 2)), "bogus")))
    with pytest.raises(ValueError, match="'w'.*expected 3 dims"):
        optim.labels_from_roles(state_of(w=(np.zeros((2, 2)), "expert")))
    with pytest.raises(ValueError, match="'w'.*not an nnx.Variable"):
        optim.labels_from_roles({"w": jnp.zeros((2, 2))})


def test_lr_schedule():
    cfg = OptimConfig(warmup_steps=100, total_steps=1000)
    s = optim.lr_schedule(cfg)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(50)), cfg.peak_lr / 2, rtol=1e-6)
    np.testing.assert_allclose(float(s(100)), cfg.peak_lr, rtol=1e-6)
    end = cfg.end_lr_frac * cfg.peak_lr
    np.testing.assert_allclose(float(s(1000)), end, rtol=1e-5)
    np.testing.assert_allclose(float(s(5000)), end, rtol=1e-5)
    mid = np.array([float(s(t)) for t in range(100, 1001, 25)])
    assert np.all(np.diff(mid) < 0)
    np.testing.assert_allclose(float(s(550)), (cfg.peak_lr + end) / 2, rtol=1e-5)


def test_newton_schulz_singular_values():
    g = jax.random.normal(jax.random.key(0), (64, 128))
    sv = np.linalg.svd(np.asarray(optim.newton_schulz(g)), compute_uv=False)
    assert sv.shape == (64,) and np.abs(sv - 1).max() < 0.3, sv
    svt = np.linalg.svd(np.asarray(optim.newton_schulz(g.T.astype(jnp.bfloat16))), compute_uv=False)
    assert np.abs(svt - 1).max() < 0.3, svt  # tall and bf16 input: same quality (math in float32)


def test_grad_accum_applies_mean_gradient():
    rng = np.random.default_rng(3)
    mk = lambda: state_of(w=(rng.normal(size=(5, 8)), "matrix"), n=(rng.normal(size=(8,)), "vector"))
    params, grads = mk(), [mk() for _ in range(4)]
    cfg = cfg_for_test(clip_norm=1.0, grad_accum=2)
    got = run_steps(optim.make_optimizer(params, cfg), params, grads)
    mean = lambda a, b: jax.tree.map(lambda x, y: (x + y) / 2, a, b)
    ref_cfg = cfg_for_test(clip_norm=1.0)
    ref = run_steps(optim.make_optimizer(params, ref_cfg), params, [mean(*grads[:2]), mean(*grads[2:])])
    for k in ("w", "n"):
        np.testing.assert_array_equal(arr(got[0], k), arr(params, k))  # micro-step: unchanged
        np.testing.assert_allclose(arr(got[1], k), arr(ref[0], k), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(arr(got[2], k), arr(got[1], k))
        np.testing.assert_allclose(arr(got[3], k), arr(ref[1], k), rtol=1e-5, atol=1e-6)
        assert not np.allclose(arr(got[1], k), arr(params, k))


def test_pure_state_and_nnx_optimizer_agree():
    rng = np.random.default_rng(4)
    model = Params(w=(rng.normal(size=(6, 4)), "matrix"), e=(rng.normal(size=(2, 3, 5)), "expert"),
                   n=(rng.normal(size=(4,)), "vector"))
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
    tx = optim.make_optimizer(params, cfg_for_test())
    want = run_steps(tx, params, [grads])[0]
    pure = run_steps(tx, nnx.as_pure(params), [nnx.as_pure(grads)])[0]
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    nnx.jit(lambda o, m, g: o.update(m, g))(opt, model, grads)
    for k in ("w", "e", "n"):
        np.testing.assert_allclose(np.asarray(pure[k]), arr(want, k), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(getattr(model, k)[...]), arr(want, k), rtol=1e-6, atol=1e-7)
