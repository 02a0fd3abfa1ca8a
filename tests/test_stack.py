"""The scanned layer stack: segment plans, scanned = unrolled (values and gradients), program size
independent of depth, hub names through the stacked parameters, decode = forward on repeated layers."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import save_file

from v4jax import checkpoint, stack
from v4jax import model as M
from v4jax.config import ModelConfig
from v4jax.engine import Engine
from v4jax.sampling import SamplingConfig


def _repeating(n_layers=6, **kw):
    """tiny.json with [SWA#] + (CSA, HCA) x k + CSA: three segments, the middle one scanned."""
    ratios = ([0] + [4, 16] * n_layers)[:n_layers] + [0]
    return ModelConfig.tiny(**kw).with_runtime(num_hidden_layers=n_layers, compress_ratios=tuple(ratios))


def test_layer_plans():
    seg = stack.Segment
    assert stack.layer_plan(ModelConfig.flash()) == (seg(0, 1, 2), seg(2, 1, 1), seg(3, 2, 20))
    assert stack.layer_plan(ModelConfig.pro()) == (seg(0, 1, 2), seg(2, 1, 1), seg(3, 2, 29))
    assert stack.layer_plan(ModelConfig.named("small")) == (seg(0, 1, 2), seg(2, 2, 5))
    assert stack.layer_plan(_repeating()) == (seg(0, 1, 1), seg(1, 2, 2), seg(5, 1, 1))
    assert stack.layer_plan(_repeating(), scan=False) == tuple(seg(i, 1, 1) for i in range(6))
    m = M.abstract(_repeating())
    assert m.layer_index() == [(0, 0, 0), (1, 0, 0), (1, 1, 0), (1, 0, 1), (1, 1, 1), (2, 0, 0)]
    assert m.stack[1][0].attn.wq_a.weight.shape == (2, 128, 128)
    assert m.stack[1][0].attn.wq_a.weight.get_metadata()["axes"] == ("layers", "q_lora", "embed")


def _by_name(model_or_state_model, tree=None):
    """{checkpoint name: array} of a model (or of a params-shaped tree laid out like that model)."""
    model = model_or_state_model
    flat = dict(nnx.to_flat_state(tree if tree is not None else nnx.state(model)))
    return {n: np.asarray(flat[p].get_value()[idx]) for n, (p, idx, _) in checkpoint.expected_tensors(model).items()
            if p in flat}


@pytest.fixture(scope="module")
def pair():
    """The same random model (same init keys), scanned, unrolled, and scanned with each row
    rematerialised, with its loss gradients."""
    out = {}
    ids = jax.random.randint(jax.random.key(3), (2, 64), 2, 200)
    for scan, kw in ((True, {}), (False, {}), ("remat", {"remat": "layer"})):
        m = M.build(_repeating(scan_layers=bool(scan), **kw), seed=5)
        g, params, rest = nnx.split(m, nnx.Param, ...)

        def loss(p):
            logits = nnx.merge(g, p, rest)(ids)["logits"]
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])), logits

        (val, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        out[scan] = {"model": m, "loss": float(val), "logits": np.asarray(logits), "grads": _by_name(m, grads)}
    return out


def test_scanned_equals_unrolled(pair):
    a, b = pair[True], pair[False]
    assert _by_name(a["model"]).keys() == _by_name(b["model"]).keys()
    for name, x in _by_name(a["model"]).items():  # the same initial values, layer by layer
        np.testing.assert_array_equal(x, _by_name(b["model"])[name], err_msg=name)
    np.testing.assert_allclose(a["logits"], b["logits"], rtol=1e-5, atol=1e-5)
    assert abs(a["loss"] - b["loss"]) < 1e-5
    assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) > 100
    for name, g in a["grads"].items():
        np.testing.assert_allclose(g, b["grads"][name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert np.abs(a["grads"]["layers.3.attn.wq_a.weight"]).max() > 0  # a scanned row's gradient
    r = pair["remat"]  # recomputing each row in the backward changes no number
    np.testing.assert_array_equal(r["logits"], a["logits"])
    for name, g in a["grads"].items():
        np.testing.assert_allclose(r["grads"][name], g, rtol=1e-5, atol=1e-7, err_msg=name)


def _grad_program_chars(n_layers: int, scan: bool) -> int:
    cfg = _repeating(n_layers, scan_layers=scan)
    g, params, rest = nnx.split(M.abstract(cfg), nnx.Param, ...)
    ids = jax.ShapeDtypeStruct((1, 64), jnp.int32)
    f = jax.jit(jax.grad(lambda p, r, i: jnp.sum(nnx.merge(g, p, r)(i)["logits"])))
    return len(f.lower(params, rest, ids).as_text())


def test_program_size_does_not_grow_with_depth():
    """The gradient program with 2 vs 4 rows of (CSA, HCA): scanned, the same size; unrolled, ~1.7x."""
    scanned = _grad_program_chars(9, True) / _grad_program_chars(5, True)
    unrolled = _grad_program_chars(9, False) / _grad_program_chars(5, False)
    assert scanned < 1.05 and unrolled > 1.5, (scanned, unrolled)


def test_hub_names_round_trip_through_the_stack(pair, tmp_path):
    m = pair[True]["model"]
    tensors = checkpoint.hub_tensors(m)
    assert "layers.3.attn.indexer.wq_b.weight" in tensors and "layers.4.ffn.experts.7.w2.weight" in tensors
    assert "layers.4.hc_attn_fn" in tensors
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with open(tmp_path / "config.json", "w") as f:
        json.dump(m.cfg.to_hub(), f)
    for scan in (True, False):
        loaded = checkpoint.load_hub(str(tmp_path), scan_layers=scan)
        got = _by_name(loaded)
        for name, x in tensors.items():
            np.testing.assert_array_equal(got[name], x, err_msg=name)
    assert os.path.getsize(tmp_path / "model.safetensors") > 4 * M.count_params(m.cfg)["total"] * 0.9


def test_decode_equals_forward_on_repeated_layers(pair):
    m = pair[True]["model"]
    ids = np.asarray(jax.random.randint(jax.random.key(3), (2, 64), 2, 200))
    full = pair[True]["logits"]  # forward logits of the same ids
    eng = Engine(m, max_context=64, batch=2, min_bucket=64, prefill_chunk=32)
    first = eng.prefill([ids[0, :40], ids[1, :40]])
    np.testing.assert_allclose(first, full[:, 39], rtol=1e-4, atol=1e-4)
    for t in range(40, 48):
        _, logits = eng.decode(ids[:, t], SamplingConfig(), jax.random.key(0))
        np.testing.assert_allclose(np.asarray(logits), full[:, t], rtol=1e-4, atol=1e-4, err_msg=str(t))


def test_relayout_moves_every_tensor(pair):
    m = pair[True]["model"]
    flat = checkpoint.relayout(m, scan_layers=False)
    assert flat.plan == stack.layer_plan(m.cfg, scan=False) and flat.stack[2][0].attn.wq_a.weight.shape[0] == 1
    back = checkpoint.relayout(flat, scan_layers=True)
    want = _by_name(m)
    for model in (flat, back):
        got = _by_name(model)
        assert got.keys() == want.keys()
        for name, x in want.items():
            np.testing.assert_array_equal(got[name], x, err_msg=name)
