"""G2 (GPU): decode time per token at 8K, 128K and 1M context vs the cost model, configs/small.json.

v4jax's `Engine` (preallocated, donated decode state, batch 1) with max_context = the largest context.
The decode cost depends only on shapes (the bucket of entry rows a step reads), not on the state's
values, so instead of prefilling 1M tokens each context is reached by setting the engine's position to
L - 1 (the state holds zeros; the step at position L - 1 reads exactly the rows of context L). Timed:
  engine   `Engine.decode` (one token, greedy; includes the host-side bookkeeping)
  step     the engine's own compiled step at that bucket alone, donated state (bench.e2e_decode._jit_step_s)
Model per token at context L (multiply-add = 2), the decode roofline of spec §1:
  FLOPs = 2 * (parameters a batch-1 step multiplies: main layers, top-k routed experts, head)
          + sum over main layers of the §1 attention FLOPs (CSA: indexer over L/4 keys + core over
          min(k, L/4) + window; HCA: L/m' + window; SWA: window)
  bytes = parameters read (bench.e2e_decode.param_bytes_read) + state rows read
          (bench.e2e_decode.state_bytes_read: windows, tails, CSA indexer keys + top-k entries, HCA entries)
  time  = max(FLOPs / peak, bytes / bandwidth), bandwidth measured (donated jitted copy).
Gate: the growth of time per token from the smallest context, t(L) / t(L0), measured on the compiled
step vs the model's, within +-25 % at every L (fixed per-step costs the model does not have, such as
kernel launches, flatten the measured growth; they are what this exposes).
GPU: bf16 compute and parameters, contexts 8K, 128K, 1M. CPU (no GPU): the tiny config (f32) at 8K and
32K (--quick) or 8K, 32K, 128K, verdict "G2 SKIP (no GPU)".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.config import ModelConfig
from v4jax.engine import Engine
from v4jax.model import build
from v4jax.sampling import SamplingConfig

from . import model as cost
from .e2e_decode import _jit_step_s, param_bytes_read, state_bytes_read
from .timing import fmt_s, memory_bandwidth, time_calls, verdict
from .train_mfu import SPEC_MEASURED_GPU, measured_matmul_peak, nominal_peak, on_gpu

TOL = 0.25
CTX_GPU = (8192, 131072, 1048576)
CTX_CPU_QUICK = (8192, 32768)
CTX_CPU = (8192, 32768, 131072)


def decode_matmul_params(model, cfg) -> float:
    """Parameters one batch-1 decode step multiplies with (main layers; top-k experts; head; no embedding)."""
    n = 0.0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if str(path[0]) in ("mtp", "embed"):
            continue
        role, size = var.get_metadata().get("role"), var.size
        if role in ("matrix", "head"):
            n += size
        elif role == "expert":
            n += size * cfg.num_experts_per_tok / cfg.n_routed_experts
    return n


def attn_decode_flops(cfg, L: int) -> float:
    f = 0.0
    for i in range(cfg.num_hidden_layers):
        r = cfg.layer_ratio(i)
        kind = "swa" if r == 0 else ("csa" if r == 4 else "hca")
        f += cost.layer_decode_cost(kind, L, cfg.num_attention_heads, cfg.head_dim, m=4, m_hca=max(r, 1),
                                    topk=cfg.index_topk, window=cfg.sliding_window, idx_heads=cfg.index_n_heads,
                                    idx_dim=cfg.index_head_dim)["flops"]
    return f


def _config(gpu: bool):
    if gpu:
        return ModelConfig.named("small", dtype="bfloat16", param_dtype="bfloat16")
    return ModelConfig.tiny(attn_block=512)


def _engine_timer(eng, sampling, L):
    key, tok = jax.random.key(0), np.array([3])

    def call():
        eng.pos[:] = L - 1  # every call decodes the token at position L - 1 (context L)
        eng.decode(tok, sampling, key)

    return time_calls(call, runs=10, warmup=2)["median_s"]


def run(quick: bool = False) -> dict:
    gpu = on_gpu()
    cfg = _config(gpu)
    ctx = CTX_GPU if gpu else (CTX_CPU_QUICK if quick else CTX_CPU)
    if gpu:
        peak_nom, kind = nominal_peak()
        peak = peak_nom or SPEC_MEASURED_GPU
        bw = memory_bandwidth(1024)
    else:
        kind = jax.devices()[0].device_kind
        peak = measured_matmul_peak(jnp.float32, 1024)
        bw = memory_bandwidth(64 if quick else 128)
    eng = Engine(build(cfg), max_context=max(ctx))
    pbytes = param_bytes_read(eng.model, cfg)
    n_mm = decode_matmul_params(eng.model, cfg)
    print(f"G2  decode per token, {'configs/small.json' if gpu else 'tiny config'} ({cfg.num_hidden_layers} layers, "
          f"dim {cfg.dim}, {cfg.dtype}), batch 1, Engine max_context {max(ctx)}; device {kind}; peak "
          f"{peak / 1e12:.3f} TFLOP/s, bandwidth {bw / 1e9:.1f} GB/s; params read {pbytes / 1e6:.1f} MB, "
          f"matmul params {n_mm / 1e6:.1f} M")
    print(f"{'L':>8} {'engine':>10} {'step':>10} {'GFLOP':>7} {'MB read':>8} {'model':>10} {'step/model':>10} "
          f"{'growth':>7} {'model':>7}")
    sampling, rows = SamplingConfig(), []
    for L in ctx:
        eng.pos[:] = L - 1
        t_eng = _engine_timer(eng, sampling, L)
        eng.pos[:] = L - 1
        t_step = _jit_step_s(eng, sampling)  # P7's timer of the engine's compiled step (donated state)
        flops = 2 * n_mm + attn_decode_flops(cfg, L)
        byts = pbytes + state_bytes_read(eng.state, cfg, L)
        model_s = max(flops / peak, byts / bw)
        rows.append({"L": L, "engine_s": t_eng, "step_s": t_step, "flops": flops, "bytes": byts, "model_s": model_s})
    for r in rows:
        r["growth"] = r["step_s"] / rows[0]["step_s"]
        r["model_growth"] = r["model_s"] / rows[0]["model_s"]
        r["ratio"] = r["growth"] / r["model_growth"]
        dm = r["model_s"] - rows[0]["model_s"]  # marginal: fixed per-step costs cancel (informational)
        r["marginal_ratio"] = (r["step_s"] - rows[0]["step_s"]) / dm if dm > 0 else None
        print(f"{r['L']:8d} {fmt_s(r['engine_s']):>10} {fmt_s(r['step_s']):>10} {r['flops'] / 1e9:7.3f} "
              f"{r['bytes'] / 1e6:8.1f} {fmt_s(r['model_s']):>10} {r['step_s'] / r['model_s']:10.2f} "
              f"{r['growth']:6.2f}x {r['model_growth']:6.2f}x"
              + ("" if r["marginal_ratio"] is None else f"  marginal time / marginal model {r['marginal_ratio']:.2f}"))
    worst = max(rows[1:], key=lambda r: abs(r["ratio"] - 1))
    ok = all(abs(r["ratio"] - 1) <= TOL for r in rows[1:])
    note = (f"worst measured/model growth of time per token {rows[0]['L']}->{worst['L']}: "
            f"{worst['growth']:.2f}x vs {worst['model_growth']:.2f}x, target within +-{TOL:.0%}")
    if gpu:
        line = verdict("G2", ok, worst["ratio"], note)
    else:
        ok = True
        line = f"G2 SKIP (no GPU)  (CPU smoke run, tiny config: ratio={worst['ratio']:.3f}, {note})"
    print(line)
    return {"rows": rows, "peak": peak, "bandwidth": bw, "device_kind": kind, "pass": bool(ok), "skipped": not gpu,
            "lines": [line]}
