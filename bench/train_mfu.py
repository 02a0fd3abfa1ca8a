"""G1 (GPU): training-step MFU of configs/small.json at S = 4096, bf16 compute.

The step is v4jax's own: `training.make_train_step` (one jitted pure (state, batch) -> (state, metrics),
state donated) with the optimiser the trainer builds (`optim.make_optimizer`: clip + Muon / AdamW),
random tokens (one document per row). Timed as `state = step(state)`, median of >= 5 steps after the
compile / warm-up step.

Model FLOPs per optimiser step (multiply-add = 2; T = tokens per step = rows x S x grad_accum):
  matmul   6 * N_mm * T. N_mm = the parameters a token multiplies with: every "matrix" parameter
           (attention, compressors, indexer, shared expert, router, mHC mixing, MTP projections), the
           routed experts x top-k / n_experts, and the LM head twice (main + MTP logits); the input
           embedding (a lookup) is not counted. (count_params' "active" includes the embedding table.)
  attention 3 x forward attention-core FLOPs of every layer (main + MTP block), per sequence, with V4's
           cost model (spec §1, perf_model.layer_prefill_flops): CSA = lightning indexer over the S/4
           compressed keys + core over min(k, t/4) selected entries + the 128-token window, HCA = all t/128
           entries + window, SWA = window. This is the "useful" count; the blocked implementation also
           scores masked entries, which is not credited.
  MaxText  for comparison: the same 6 * N_mm * T plus MaxText's dense causal attention count,
           3 x 4 * S^2 / 2 * n_heads * head_dim per layer and sequence (what MaxText's V4, which computes
           CSA/HCA as dense masked attention, would credit). Printed, not gated.
MFU = model FLOPs / (step time x peak). Peak: the nominal dense bf16 figure of the device kind
(H100 SXM / H200: 989.4 TFLOP/s; gated on this one); also printed against the spec's measured 790 TFLOP/s
and against a bf16 matmul measured here (8192^3, jitted). On CPU: a measured f32 matmul.
GPU run: bf16 compute, fp32 parameters, grouped MoE dispatch with `ragged_dot` when this v4jax has it;
rows x grad_accum micro-batches (Muon's Newton-Schulz runs once per optimiser step, so a larger
global batch amortises it). Environment overrides: V4_G1_SEQ, V4_G1_ROWS, V4_G1_ACCUM, V4_G1_MOE
(moe_impl[:moe_kernel]), V4_G1_CONFIG. Out-of-memory -> rows halved and retried.
CPU (no GPU): a smoke run of the same code, f32: --quick = the tiny config cut to 2 layers (CSA, HCA) +
its MTP block, S = 256, 1 row, compiled at LLVM opt level 0 (compiles ~2x faster, runs slower), no
separate optimiser timing; full = the tiny config (4 layers) at S = 1024, 1 row. Verdict "G1 SKIP (no GPU)".
(configs/small.json's train step at S = 512 was checked once on the CPU: one step ~ minutes there.)
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax import optim
from v4jax import training as T
from v4jax.config import ModelConfig
from v4jax.flops import GPU_BF16_PEAK, matmul_params, step_flops
from v4jax.model import abstract, build, count_params

from .timing import fmt_s, time_fn, time_stateful, verdict

TARGET = 0.40
SPEC_MEASURED_GPU = 790e12  # spec §3: H100 / H200 bf16 as measured
NOMINAL_BF16 = GPU_BF16_PEAK  # dense (no sparsity) bf16 tensor-core peaks by device kind


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def nominal_peak() -> tuple[float | None, str]:
    kind = jax.devices()[0].device_kind
    low = kind.lower()
    for k in sorted(NOMINAL_BF16, key=len, reverse=True):
        if k in low:
            return NOMINAL_BF16[k], kind
    return None, kind


def measured_matmul_peak(dtype, n: int) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=dtype))
    return 2 * n ** 3 / time_fn(f, a, a, runs=5)["median_s"]


# ------------------------------------------------------------------------------------ the step
def _runtime(gpu: bool) -> dict:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    if not gpu:
        return {}
    kw = {"dtype": "bfloat16", "param_dtype": "float32"}
    moe = os.environ.get("V4_G1_MOE", "grouped:ragged_dot" if "moe_kernel" in fields else "auto")
    impl, _, kernel = moe.partition(":")
    kw["moe_impl"] = impl
    if kernel and "moe_kernel" in fields:
        kw["moe_kernel"] = kernel
    return kw


def _batch(cfg, rows: int, S: int, key):
    tok = jax.random.randint(key, (rows, S), 2, cfg.vocab_size, jnp.int32)
    return {"tokens": tok, "segment_ids": jnp.zeros((rows, S), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (rows, S))}


def measure_step(cfg, S: int, rows: int, accum: int, runs: int, smoke: bool = False) -> dict:
    model = build(cfg)
    params = nnx.state(model, nnx.Param)
    ocfg = optim.OptimConfig(total_steps=10_000, warmup_steps=100)
    tx = optim.make_optimizer(params, ocfg)  # grad_accum is done by the step (one update per call)
    lcfg = T.LossConfig(eos_id=cfg.eos_token_id)
    ts = T.init_train_state(model, tx, lcfg)
    graphdef = nnx.graphdef(model)
    del model, params
    # smoke (CPU --quick): LLVM opt level 0 compiles about twice as fast (the code runs slower)
    opts = {"xla_backend_optimization_level": 0} if smoke else None
    step = T.make_train_step(graphdef, tx, lcfg, grad_accum=accum, compiler_options=opts)
    batch = _batch(cfg, rows * accum, S, jax.random.key(1))
    off = jnp.asarray(False)
    last = {}

    def one(s):
        s, last["m"] = step(s, batch, off)
        return s

    summ, ts = time_stateful(one, ts, runs=runs, warmup=1)
    loss = float(last["m"]["loss"])
    opt_s = None if smoke else _optimizer_s(tx, ts)
    return {"step_s": summ["median_s"], "min_s": summ["min_s"], "loss": loss, "optimizer_s": opt_s}


def _optimizer_s(tx, ts) -> float:
    """The optimiser update alone (params + opt state donated), for the step's breakdown."""
    def upd(state, grads):
        p, o = state
        u, o = tx.update(grads, o, p)
        return jax.tree.map(lambda a, b: a + b, p, u), o
    f = jax.jit(upd, donate_argnums=(0,))
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 1e-4, p.dtype), ts["params"])
    state = (jax.tree.map(lambda x: x + 0, ts["params"]), ts["opt"])
    summ, _ = time_stateful(lambda s: f(s, grads), state, runs=5, warmup=1)
    return summ["median_s"]


def _is_oom(e: Exception) -> bool:
    s = str(e)
    return "RESOURCE_EXHAUSTED" in s or "Out of memory" in s or "out of memory" in s


def _settings(quick: bool, gpu: bool):
    if gpu:
        name, S, rows, accum = "small", 4096, 8, 4
    elif quick:
        name, S, rows, accum = "tiny", 256, 1, 1
    else:
        name, S, rows, accum = "tiny", 1024, 1, 1
    env = os.environ
    return (env.get("V4_G1_CONFIG", name), int(env.get("V4_G1_SEQ", S)), int(env.get("V4_G1_ROWS", rows)),
            int(env.get("V4_G1_ACCUM", accum)))


def run(quick: bool = False) -> dict:
    gpu = on_gpu()
    name, S, rows, accum = _settings(quick, gpu)
    small = ModelConfig.named("small")
    cs = count_params(small)
    print(f"G1  configs/small.json: total {cs['total'] / 1e6:.1f} M params ({cs['total_main'] / 1e6:.1f} M without MTP), "
          f"active {cs['active'] / 1e6:.1f} M (incl. the {small.vocab_size * small.dim / 1e6:.1f} M embedding table), "
          f"N_mm {matmul_params(small) / 1e6:.1f} M")
    cfg = ModelConfig.named(name, **_runtime(gpu))
    if quick and not gpu and name == "tiny":  # smoke: 2 main layers (one CSA, one HCA) + the MTP block (SWA)
        cfg = dataclasses.replace(cfg, num_hidden_layers=2, num_hash_layers=1, compress_ratios=(4, 16, 0))
    if gpu:
        peak_nom, kind = nominal_peak()
        peak_meas = measured_matmul_peak(jnp.bfloat16, 8192)
    else:
        peak_nom, kind = None, jax.devices()[0].device_kind
        peak_meas = measured_matmul_peak(jnp.float32, 1024 if quick else 2048)
    runs = 5
    while True:
        try:
            r = measure_step(cfg, S, rows, accum, runs, smoke=quick and not gpu)
            break
        except Exception as e:  # noqa: BLE001 - only an OOM is retried
            if not (_is_oom(e) and rows > 1):
                raise
            print(f"  out of memory with {rows} rows x {S}: retrying with {rows // 2}")
            rows //= 2
    n_seq = rows * accum
    fl = step_flops(cfg, S, n_seq)
    t = r["step_s"]
    achieved = fl["total"] / t
    print(f"  run: config {name} ({cfg.dtype} compute, {cfg.param_dtype} params, moe_impl {cfg.moe_impl}"
          f"{'/' + cfg.moe_kernel if hasattr(cfg, 'moe_kernel') and cfg.moe_impl == 'grouped' else ''}), "
          f"S={S}, {rows} rows x {accum} micro-batches = {n_seq * S} tokens/step, device {kind}")
    print(f"  step {fmt_s(t)} (min {fmt_s(r['min_s'])}"
          f"{'' if r['optimizer_s'] is None else '; optimizer update alone ' + fmt_s(r['optimizer_s'])}), "
          f"loss {r['loss']:.3f}, {n_seq * S / t:,.0f} tokens/s")
    print(f"  FLOPs/step: 6*N_mm*T {fl['matmul'] / 1e12:.3f} TF (N_mm {fl['n_mm'] / 1e6:.2f} M) + V4 attention "
          f"{fl['attn_v4'] / 1e12:.3f} TF = {fl['total'] / 1e12:.3f} TF; MaxText dense-causal attention "
          f"{fl['attn_dense'] / 1e12:.3f} TF (total {fl['maxtext_total'] / 1e12:.3f} TF)")
    mfus = {}
    peaks = [("measured matmul", peak_meas)]
    if gpu:
        peaks = ([("nominal " + kind, peak_nom)] if peak_nom else []) + [("spec 790 TF", SPEC_MEASURED_GPU)] + peaks
    for label, pk in peaks:
        mfus[label] = (fl["total"] / t / pk, fl["maxtext_total"] / t / pk)
        print(f"  MFU vs {label} ({pk / 1e12:.3f} TFLOP/s): {mfus[label][0]:.1%} (V4 attention count), "
              f"{mfus[label][1]:.1%} (MaxText dense-causal count)")
    gate = mfus[peaks[0][0]][0]
    if gpu:
        ok = gate >= TARGET
        line = verdict("G1", ok, gate / TARGET, f"MFU {gate:.1%} vs {peaks[0][0]}, target >= {TARGET:.0%}; "
                       f"{achieved / 1e12:.1f} TFLOP/s model FLOPs")
    else:
        ok = True
        line = (f"G1 SKIP (no GPU)  (CPU smoke run, {name} S={S}: MFU {gate:.1%} of measured f32 matmul "
                f"{peak_meas / 1e9:.0f} GFLOP/s, step {fmt_s(t)})")
    print(line)
    return {"config": name, "S": S, "rows": rows, "accum": accum, "flops": fl, "mfu": mfus, "peak_measured": peak_meas,
            "peak_nominal": peak_nom, "device_kind": kind, **r, "small_params": cs, "pass": bool(ok),
            "skipped": not gpu, "lines": [line]}
