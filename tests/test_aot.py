"""Ahead-of-time compilation for a TPU slice on this CPU machine (libtpu describes the slice; the real
TPU compiler, Mosaic included, compiles): the tiny config's train step and decode steps with the
Pallas CSA kernel and megablox, on a mesh with every axis > 1, memory as the shardings imply."""
import math
import os

import jax
import numpy as np
import pytest

from v4jax import aot, engine
from v4jax.config import ModelConfig
from v4jax.trainer import RunConfig, Trainer

TOPOLOGY = "v5p:2x2x2"  # 8 chips: fsdp 2 x expert 2 x tensor 2
MESH = "fsdp=2,expert=2,tensor=2"
KERNELS = dict(attention_kernel="pallas_tpu", moe_kernel="megablox")


@pytest.fixture(scope="module")
def devices():
    try:
        return aot.tpu_devices(TOPOLOGY)
    except aot.AOTError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install libtpu (the test extra): {e}")
        pytest.skip(f"libtpu not installed: pip install -e '.[test]' ({e})")


def _shard_bytes(tree) -> int:
    """Per-device bytes the shardings of a ShapeDtypeStruct tree imply (device 0's shard of each leaf)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.shape else ()
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def _full_bytes(tree) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_tiny_train_step_compiles_for_tpu(devices):
    rc = RunConfig(mesh=MESH, batch=8, seq_len=256, moe_impl="grouped", **KERNELS)  # megablox per shard
    trainer = Trainer(rc, devices=devices, abstract=True)
    rep = trainer.compile_plan()
    mem = rep["per_device"]
    assert rep["generation"] == "v5p" and rep["chips"] == 8 and rep["fits"]
    assert rep["mesh"] == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
    # the state is donated: its arguments are the outputs
    state = _shard_bytes(trainer.ts)
    assert mem["alias_bytes"] >= 0.95 * state
    # per-device arguments = the shards the rules table implies (TPU tiles pad small arrays a little)
    assert state <= mem["argument_bytes"] <= 1.3 * state + (1 << 20), (state, mem)
    experts = [v for p, v in _flat(trainer.ts["params"]) if ".experts.w" in p]
    # routed experts [R, E, F, d] split over expert x tensor x fsdp
    assert _shard_bytes(experts) * 8 == _full_bytes(experts)
    assert "tpu_custom_call" in rep["_compiled"].as_text()  # the Pallas kernels went through Mosaic
    assert rep["compiled_flops_per_device"] > 0 and rep["analytic_flops_per_device"] > 0


def _flat(state):
    from flax import nnx
    return [(".".join(map(str, p)), v.get_value()) for p, v in nnx.to_flat_state(state)]


def test_tiny_decode_steps_compile_for_tpu(devices):
    cfg = ModelConfig.tiny(dtype="bfloat16", param_dtype="bfloat16", **KERNELS)
    mesh = aot.mesh_for("data=2,expert=2,tensor=2", devices)
    plan = engine.compile_plan(cfg, devices, mesh, max_context=4096, kv_layout="fp8", batch=2, chunk=256)
    for name in ("prefill", "decode"):
        rep, mem = plan[name], plan[name]["per_device"]
        # (arguments a step never reads, e.g. the MTP block's weights in decode, are dropped by jit)
        need = rep["params_bytes_per_device"] + rep["state_bytes_per_device"]
        assert rep["fits"] and 0.8 * need <= mem["argument_bytes"] <= need + (1 << 20), (name, rep)
        # the decode state (and the pending streams) are donated: updated in place, never copied out
        assert rep["state_bytes_per_device"] <= mem["alias_bytes"] <= mem["output_bytes"], (name, rep)
    assert plan["decode"]["per_device"]["temp_bytes"] < plan["prefill"]["per_device"]["temp_bytes"]


def test_unknown_topology_is_named(devices):
    with pytest.raises(aot.AOTError, match="cannot describe topology 'v9z:1x1'"):
        aot.tpu_devices("v9z:1x1")


def test_out_of_memory_is_a_plan_not_a_crash():
    chip = {"generation": "v5p", "hbm_per_device": 95 << 30}
    err = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                       "temporaries (109.25G) exceeds available HBM (95.74G).")
    rep = aot._out_of_memory(err, chip, 1.0)
    assert rep["fits"] is False and rep["per_device"]["required_gib"] == 109.25
    with pytest.raises(RuntimeError, match="other"):
        aot._out_of_memory(RuntimeError("some other failure"), chip, 1.0)

