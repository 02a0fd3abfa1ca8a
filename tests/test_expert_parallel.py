"""The expert-parallel MoE dispatch ("ep": tokens sent to their experts' devices with all_to_all inside
shard_map) equals the dense dispatch on 8 fake CPU devices: forward, gradients, the capacity rule, the
automatic choice, and a whole train step against a single-device dense step."""
import contextlib
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import FIXTURES
from v4jax import model as M
from v4jax import moe
from v4jax import training as T
from v4jax.config import ModelConfig
from v4jax.layers import Keys
from v4jax.sharding import batch_sharding, make_mesh, state_shardings

CFG = ModelConfig.from_hub(os.path.join(FIXTURES, "train-tiny.json"))  # d 64, E 8, F 64, k 2
MESHES = ["expert=8", "data=2,expert=4", "expert=4,tensor=2"]
FAST = {"xla_backend_optimization_level": 0}  # XLA:CPU compiles in about half the time


def _experts(capacity_factor=0.0):
    ex = moe.Experts(CFG, Keys(3))
    ex.capacity_factor = capacity_factor
    return ex


def _inputs(t=64, seed=0):
    """x [t, d], routing weights [t, k], distinct expert indices [t, k] (skewed towards experts 0-1)."""
    kx, kw, ki = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (t, CFG.dim))
    w = jax.random.uniform(kw, (t, CFG.num_experts_per_tok), minval=0.2, maxval=1.5)
    logits = jax.random.normal(ki, (t, CFG.n_routed_experts)) + 2.0 * (jnp.arange(CFG.n_routed_experts) < 2)
    idx = jax.lax.top_k(logits, CFG.num_experts_per_tok)[1].astype(jnp.int32)
    return x, w, idx


def _run(ex, impl, mesh, x, w, idx):
    """(y, grads wrt x, w, w1, w2, w3) of sum(y * c) with `impl`, weights placed by the rules table; and
    whether the compiled function has an all-to-all."""
    c = jax.random.normal(jax.random.key(9), x.shape)
    gdef, state = nnx.split(ex)
    if mesh is not None:
        state = jax.device_put(state, state_shardings(state, mesh))
        x, w, idx = (jax.device_put(a, batch_sharding(mesh, a.shape)) for a in (x, w, idx))

    def f(x, w, state, idx):
        y = getattr(nnx.merge(gdef, state), impl)(x, w, idx)
        return jnp.sum(y * c), y

    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)).lower(x, w, state, idx).compile(FAST)
        (_, y), (gx, gw, gs) = fn(x, w, state, idx)
    out = tuple(np.asarray(a) for a in (y, gx, gw, gs["w1"][...], gs["w2"][...], gs["w3"][...]))
    return out, "all-to-all" in fn.as_text()


@pytest.fixture(scope="module")
def dense_ref():
    x, w, idx = _inputs()
    return (x, w, idx), _run(_experts(), "dense", None, x, w, idx)[0]


def _assert_same(got, ref):
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-5)  # forward
    for name, a, b in zip(("x", "w", "w1", "w2", "w3"), got[1:], ref[1:]):
        scale = np.abs(b).max()
        assert np.abs(a - b).max() <= 1e-5 * scale, (name, np.abs(a - b).max(), scale)


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_ep_forward_and_grads_equal_dense(mesh_spec, dense_ref):
    (x, w, idx), ref = dense_ref
    got, a2a = _run(_experts(), "ep", make_mesh(mesh_spec), x, w, idx)
    assert a2a  # tokens really travel between the expert shards
    _assert_same(got, ref)


def test_ep_without_expert_axis_is_dense(dense_ref):
    (x, w, idx), ref = dense_ref
    got, a2a = _run(_experts(), "ep", make_mesh("data=8"), x, w, idx)
    assert not a2a
    _assert_same(got, ref)


def test_auto_chooses_ep_only_where_it_applies():
    ex = _experts()
    e, k = CFG.n_routed_experts, CFG.num_experts_per_tok
    assert ex.choose("auto", 64, k) == "grouped"  # no mesh
    with jax.set_mesh(make_mesh("data=2,expert=4")):
        assert ex.choose("auto", 64, k) == "ep"
        assert ex.choose("auto", 2, k) == "gather"  # T*k < E: decode
        assert ex.choose("auto", 12, k) == "grouped"  # 12 tokens do not split over 8 devices
        assert ex.choose("dense", 64, k) == "dense"
    with jax.set_mesh(make_mesh("data=8")):
        assert ex.choose("auto", 64, k) == "grouped"
    with jax.set_mesh(make_mesh("expert=8")):
        assert moe.ep_layout(64, e, CFG.moe_intermediate_size)[1:] == (("data", "fsdp", "expert"), "expert", None)
        assert moe.ep_layout(64, 12, CFG.moe_intermediate_size) is None  # 12 experts do not split 8 ways


def test_capacity_factor_drops_assignments_past_capacity():
    """factor f: c = ceil(f * t_local * k / E) slots per (device, expert); later assignments (token order
    on each device) contribute nothing."""
    x, w, idx = _inputs()
    mesh = make_mesh("expert=8")
    t_local, k, e = 8, CFG.num_experts_per_tok, CFG.n_routed_experts
    cap = moe.ep_capacity(t_local, k, e, 1.0)
    assert cap == 2 and moe.ep_capacity(t_local, k, e, 0.0) == t_local
    keep = np.ones(idx.shape, bool)
    for dev in range(8):
        seen = {}
        for t in range(dev * t_local, (dev + 1) * t_local):
            for j in range(k):
                ex_id = int(idx[t, j])
                seen[ex_id] = seen.get(ex_id, 0) + 1
                keep[t, j] = seen[ex_id] <= cap
    assert 0 < (~keep).sum() < keep.size  # the skewed routing really overflows some experts
    ref = _run(_experts(), "dense", None, x, w * keep, idx)[0][0]
    got = _run(_experts(capacity_factor=1.0), "ep", mesh, x, w, idx)[0][0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- a whole train step
# train-tiny cut to one score-routed SWA layer and no MTP block; with SGD and XLA's backend optimisation
# off (FAST), the two compilations stay short (the MoE dispatch is what differs between them)
STEP_CFG = dataclasses.replace(CFG, num_hidden_layers=1, compress_ratios=[0], num_hash_layers=0,
                               num_nextn_predict_layers=0)


def _batch(b=8, s=16, seed=0):
    rng = np.random.default_rng(seed)
    seg = np.ones((b, s), np.int32)
    seg[:, s // 2:] = 2  # two documents per row
    pos = np.concatenate([np.arange(s // 2), np.arange(s - s // 2)]).astype(np.int32)
    return {"tokens": rng.integers(2, CFG.vocab_size, (b, s)).astype(np.int32), "segment_ids": seg,
            "positions": np.tile(pos, (b, 1))}


def _train(model, mesh_spec, impl, steps=2):
    """[(loss, grad norm)] of `steps` train steps of `model` (copied) with dispatch `impl` on `mesh_spec`
    (None: one device), and whether the compiled step has an all-to-all."""
    lcfg, tx = T.LossConfig(ar_delta=0), optax.sgd(0.5)
    graphdef = nnx.graphdef(M.abstract(dataclasses.replace(STEP_CFG, moe_impl=impl)))
    ts = jax.tree.map(jnp.copy, T.init_train_state(model, tx, lcfg))
    mesh = make_mesh(mesh_spec or {"data": 1})
    repl = NamedSharding(mesh, P())
    ts = dict(ts, params=jax.device_put(ts["params"], state_shardings(ts["params"], mesh)),
              rest=jax.device_put(ts["rest"], state_shardings(ts["rest"], mesh)),
              opt=jax.device_put(ts["opt"], repl), step=jax.device_put(ts["step"], repl))
    batch = {k: jax.device_put(v, batch_sharding(mesh, v.shape)) for k, v in _batch().items()}
    with jax.set_mesh(mesh):
        step = T.make_train_step(graphdef, tx, lcfg).lower(ts, batch, jnp.asarray(False)).compile(FAST)
        out = []
        for _ in range(steps):
            ts, met = step(ts, batch, jnp.asarray(False))
            out.append((float(met["loss"]), float(met["grad_norm"])))
    return np.array(out), "all-to-all" in step.as_text()


def test_train_step_ep_equals_single_device_dense():
    model = M.build(STEP_CFG)
    ref, ref_a2a = _train(model, None, "dense")
    got, got_a2a = _train(model, "data=2,fsdp=2,expert=2", "ep")
    assert got_a2a and not ref_a2a
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert ref[1, 0] < ref[0, 0]  # the second step saw the updated parameters


@pytest.mark.parametrize("mesh_spec", ["expert=4,tensor=2", "expert=8"])
def test_decode_gather_per_shard_equals_dense(mesh_spec):
    """Decode (T*k < E): each device runs only the pairs whose expert it holds; no expert is gathered."""
    x, w, idx = _inputs(t=2, seed=4)
    ref = _run(_experts(), "dense", None, x, w, idx)[0]
    got, _ = _run(_experts(), "gather", make_mesh(mesh_spec), x, w, idx)
    _assert_same(got, ref)
