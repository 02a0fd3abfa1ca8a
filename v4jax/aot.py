"""Ahead-of-time compilation for TPU slices, on any machine: libtpu describes the slice, the real TPU
compiler (XLA:TPU and Mosaic) compiles the step, and nothing is allocated.

    devices = tpu_devices("v5p:2x2x1")        # abstract TPU devices (no hardware needed)
    report  = compile_report(jitted.lower(*abstract_args), devices)

`compile_report` reads the compiled program: per-chip argument / output / temporary bytes from
`memory_analysis()` (argument and output bytes that alias each other through donation counted
once), the chip's HBM from the `CHIPS` table, whether it fits, compile seconds, generated-code size
and `cost_analysis()` FLOPs. The train and decode plans built on it are `trainer.compile_plan` and
`engine.compile_plan` (what `train.py --compile-only` and `infer.py compile` print).

Run with `JAX_PLATFORMS=cpu` (the scripts set it when --topology is given): the topology API then
works beside the CPU backend, and no TPU runtime is started.
"""
from __future__ import annotations

import math
import os
import re
import time

GIB = 1 << 30

# device_kind -> (generation, HBM bytes per chip, peak dense bf16 FLOP/s per chip): public chip
# specifications. A chip whose TensorCores the topology lists as separate devices (v4 and tpu7x
# descriptions do: two devices at one chip coordinate) shares its HBM and FLOPs between them.
CHIPS = {
    "TPU v4": ("v4", 32 * GIB, 275e12),
    "TPU v5 lite": ("v5e", 16 * GIB, 197e12),
    "TPU v5": ("v5p", 95 * GIB, 459e12),
    "TPU v6 lite": ("v6e", 32 * GIB, 918e12),
    "TPU7x": ("tpu7x", 192 * GIB, 2307e12),
}


class AOTError(RuntimeError):
    """The TPU topology cannot be described here (libtpu missing or an unknown topology name)."""


def tpu_devices(topology: str):
    """Abstract devices of a TPU slice, e.g. "v5p:2x2x1", "v6e:2x4", "v5e:4x4", "tpu7x:2x2x1"."""
    try:
        import libtpu  # noqa: F401  (the topology description lives in libtpu)
    except ImportError:
        raise AOTError("compiling for a TPU slice needs libtpu: pip install libtpu "
                       "(or pip install -e '.[tpu]', which pins the matching one)") from None
    from jax.experimental import topologies
    # describing a slice starts no TPU runtime: another process holding libtpu's lock file is no conflict
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as e:  # noqa: BLE001 - libtpu reports unknown names as a generic XlaRuntimeError
        raise AOTError(f"libtpu cannot describe topology '{topology}': {str(e).splitlines()[0]} "
                       "(examples: v4:2x2x1, v5e:2x2, v5p:2x2x1, v6e:2x4, tpu7x:2x2x1)") from None


def chip_info(devices) -> dict:
    """Generation, chips, devices and HBM per device of a slice (see `CHIPS`)."""
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise AOTError(f"unknown TPU kind '{kind}': add it to v4jax.aot.CHIPS (HBM per chip)")
    gen, hbm, peak = CHIPS[kind]
    chips = len({(getattr(d, "slice_index", 0), tuple(getattr(d, "coords", (d.id,)))) for d in devices})
    per_chip = max(1, len(devices) // chips)
    return {"generation": gen, "device_kind": kind, "devices": len(devices), "chips": len(devices) // per_chip,
            "hbm_per_device": hbm // per_chip, "peak_flops_per_device": peak / per_chip}



def compile_report(lowered, devices, analytic_flops: float | None = None) -> dict:
    """Compile `lowered` (a jax Lowered for `devices`) -> the JSON-able report described above.

    `analytic_flops`: the step's FLOPs by formula for the whole slice (shown per device beside the
    compiled count, which XLA gives per device for an SPMD program)."""
    t0 = time.time()
    chip = chip_info(devices)
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA reports HBM exhaustion as a generic runtime error
        return _out_of_memory(e, chip, time.time() - t0)
    seconds = time.time() - t0
    mem = compiled.memory_analysis()
    arg, out, tmp = (int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp"))
    alias = int(getattr(mem, "alias_size_in_bytes", 0))
    code = int(getattr(mem, "generated_code_size_in_bytes", 0))
    total = arg + out - alias + tmp
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    rep = {**chip, "compile_s": round(seconds, 1), "generated_code_bytes": code,
           "per_device": {"argument_bytes": arg, "output_bytes": out, "alias_bytes": alias, "temp_bytes": tmp,
                          "total_bytes": total, "total_gib": round(total / GIB, 3),
                          "hbm_gib": round(chip["hbm_per_device"] / GIB, 2)},
           "fits": total <= chip["hbm_per_device"], "compiled_flops_per_device": flops}
    if analytic_flops is not None:
        rep["analytic_flops_per_device"] = analytic_flops / len(devices)
        if flops:
            rep["compiled_over_analytic"] = round(flops / rep["analytic_flops_per_device"], 3)
    rep["_compiled"] = compiled
    return rep


def _out_of_memory(err: Exception, chip: dict, seconds: float) -> dict:
    """The report of a program the TPU compiler refused for lack of HBM: what it said it needs. (Its
    "HLO temporaries" figure counts the arguments too: for decode plans it matched parameters + state
    within 1 %, while the same step on a slice where it fits needs ~0.1 GiB of real temporaries.)"""
    msg = str(err)
    if "RESOURCE_EXHAUSTED" not in msg:
        raise err
    need = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", msg)
    temp = float(need.group(1)) * 1024 ** ("KMGT".index(need.group(2)) + 1) if need else None
    line = next((ln for ln in msg.splitlines() if "RESOURCE_EXHAUSTED" in ln), msg[:300])
    return {**chip, "compile_s": round(seconds, 1), "fits": False, "compiler_error": line.strip(),
            "per_device": {"required_bytes": int(temp) if temp else None,
                           "required_gib": round(temp / GIB, 2) if temp else None,
                           "hbm_gib": round(chip["hbm_per_device"] / GIB, 2)}}


def public(report: dict) -> dict:
    """The report without its compiled program (for printing as JSON)."""
    return {k: v for k, v in report.items() if not k.startswith("_")}


def mesh_for(spec: str | dict | None, devices, prefer=("fsdp",)):
    """A mesh over all `devices`: the given --mesh spec (its product must equal the device count), or
    every device on the first axis of `prefer` when no spec is given."""
    from .sharding import MESH_AXES, make_mesh, parse_mesh
    sizes = parse_mesh(spec) if not isinstance(spec, dict) else {a: spec.get(a, 1) for a in MESH_AXES}
    if spec is None or math.prod(sizes.values()) == 1:
        sizes = {a: 1 for a in MESH_AXES}
        sizes[prefer[0]] = len(devices)
    if math.prod(sizes.values()) != len(devices):
        raise AOTError(f"mesh {sizes} has {math.prod(sizes.values())} devices, the slice has {len(devices)}")
    return make_mesh(sizes, devices)
