"""P5: Muon vs AdamW optimizer step; Newton-Schulz time vs its FLOPs at the measured matmul speed.

(a) matmul speed: for every NS shape, the three matmuls one NS iteration performs on the wide (m <= n)
    form X [m, n] (batched over the experts for a stacked [E, ., .] tensor), each jitted alone, f32,
    the NS precision (`optim.NS_PRECISION`), median of >= 5 runs:
        A  = X X^T   [m, n] x [n, m]   2 m^2 n FLOPs
        A2 = A A     [m, m] x [m, m]   2 m^3
        B X          [m, m] x [m, n]   2 m^2 n        (B = b A + c A^2)
(b) v4jax's own orthogonalisation, `optim.orthogonalize` (the function `scale_by_muon` maps over the
    Muon parameters: `newton_schulz` per matrix, vmapped over expert slices; 10 steps of the hybrid
    schedule `optim.NS_COEFFS`), jitted, median of >= 5 runs. FLOPs:
        analytic  10 * (4 m^2 n + 2 m^3) per matrix (matmuls only; the axpys, norm and scaling are
                  O(m n) and left out)
        compiled  XLA's cost_analysis()["flops"] of the compiled function, printed beside. NS runs the 10
                  steps as a `lax.scan` (a while loop) and XLA's cost analysis counts a loop body once, so
                  the raw figure is ~1/10 of the work; the table shows raw x 10 ("XLA x10"), which
                  agrees with the analytic count to within the O(m n) elementwise terms
    model time = sum over the three matmuls of (10 x their FLOPs) / (their measured FLOP/s).
    `ratio` = measured NS time / model time; PASS if every shape is within [0.5, 2].
(c) the whole optimizer update on the tiny model's parameters, as the trainer builds it
    (`optim.make_optimizer`: global-norm clip, Muon for "matrix"/"expert" roles, AdamW for the rest),
    vs plain `optax.adamw` over the same parameters; each jitted as (params, opt state, grads) ->
    (params, opt state) with params and opt state donated. Informational: Muon/AdamW time ratio, next
    to a model: NS FLOPs / matmul speed + bytes / memory bandwidth (AdamW: read p, g, m, v and write p,
    m, v, 7 x 4 B per parameter; Muon parameters: read p, g, M, write p, M plus the NS work).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from v4jax import optim
from v4jax.config import ModelConfig
from v4jax.model import build

from .timing import fmt_s, memory_bandwidth, time_fn, time_stateful, verdict

LO, HI = 0.5, 2.0
N_ITERS = len(optim.NS_COEFFS)
SHAPES_FULL = ((512, 512), (1024, 256), (16, 256, 512), (1024, 1024), (2048, 512))
SHAPES_QUICK = ((512, 512), (1024, 256), (16, 256, 512))


def _wide(shape):
    """(batch, m, n) of the wide form NS iterates on (m <= n)."""
    e = shape[0] if len(shape) == 3 else 1
    r, c = shape[-2:]
    return e, min(r, c), max(r, c)


def ns_flops(shape) -> dict:
    """Analytic FLOPs of orthogonalize(shape): per matmul kind and total (matmuls only)."""
    e, m, n = _wide(shape)
    per = {"xxt": 2 * m * m * n, "aa": 2 * m ** 3, "bx": 2 * m * m * n}
    per = {k: e * v * N_ITERS for k, v in per.items()}
    return {**per, "total": sum(per.values())}


def _mm(p, q):
    return jnp.matmul(p, q, precision=optim.NS_PRECISION)


def matmul_rates(shape, runs: int) -> dict:
    """Measured FLOP/s of each of the three NS matmul shapes (jitted alone, f32)."""
    e, m, n = _wide(shape)
    lead = (e,) if e > 1 else ()
    k = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k[0], lead + (m, n), jnp.float32)
    xt = jnp.swapaxes(x, -1, -2) + 0.0  # a materialised transpose: the matmul alone is timed
    a = jax.random.normal(k[1], lead + (m, m), jnp.float32)
    out = {}
    for name, args in (("xxt", (x, xt)), ("aa", (a, a)), ("bx", (a, x))):
        t = time_fn(jax.jit(_mm), *args, runs=runs)["median_s"]
        p, q = args
        out[name] = 2 * e * p.shape[-2] * p.shape[-1] * q.shape[-1] / t
    return out


def _compiled_flops(fn, *args) -> float | None:
    try:
        ca = fn.lower(*args).compile().cost_analysis()
        if isinstance(ca, (list, tuple)):
            ca = ca[0]
        return float(ca.get("flops")) if ca and ca.get("flops") is not None else None
    except Exception:  # noqa: BLE001 - cost analysis is optional on some backends
        return None


@functools.lru_cache(maxsize=None)
def _orth():
    return jax.jit(lambda u: optim.orthogonalize(u, optim.NS_COEFFS, 1.0))


def measure_ns(shape, runs: int) -> dict:
    u = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    fn = _orth()
    t = time_fn(fn, u, runs=runs)["median_s"]
    rates = matmul_rates(shape, runs)
    fl = ns_flops(shape)
    model_s = sum(fl[k] / rates[k] for k in ("xxt", "aa", "bx"))
    return {"shape": list(shape), "ns_s": t, "flops": fl["total"], "compiled_flops": _compiled_flops(fn, u),
            "rates": rates, "matmul_gflops": fl["total"] / model_s / 1e9, "model_s": model_s,
            "ratio": t / model_s, "achieved_gflops": fl["total"] / t / 1e9}


# ---------------------------------------------------------------------------- (c) optimizer step
def _update_step(tx):
    def step(params, opt, grads):
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt
    return jax.jit(step, donate_argnums=(0, 1))


def _time_opt(tx, params, grads, runs: int) -> float:
    params = jax.tree.map(lambda x: x + 0.0, params)  # own buffers: they are donated
    opt = tx.init(params)
    step = _update_step(tx)
    summ, _ = time_stateful(lambda s: step(s[0], s[1], grads), (params, opt), runs=runs, warmup=1)
    return summ["median_s"]


def optimizer_step(runs: int, mm_rate: float, bw: float) -> dict:
    cfg = ModelConfig.tiny()
    params = nnx.state(build(cfg), nnx.Param)
    grads = jax.tree.map(lambda p: 1e-3 * jax.random.normal(jax.random.key(p.size), p.shape, p.dtype), params)
    ocfg = optim.OptimConfig(total_steps=1000, warmup_steps=10)
    muon_tx = optim.make_optimizer(params, ocfg)
    adam_tx = optax.adamw(optim.lr_schedule(ocfg), b1=ocfg.adam_b1, b2=ocfg.adam_b2, eps=ocfg.adam_eps,
                          weight_decay=ocfg.adam_weight_decay)
    labels = jax.tree.leaves(optim.labels_from_roles(params))
    leaves = jax.tree.leaves(params)
    n_muon = sum(p.size for p, lb in zip(leaves, labels) if lb == "muon")
    n_all = sum(p.size for p in leaves)
    ns = sum(ns_flops(p.shape)["total"] for p, lb in zip(leaves, labels) if lb == "muon")
    t_adam = _time_opt(adam_tx, params, grads, runs)
    t_muon = _time_opt(muon_tx, params, grads, runs)
    model_adam = 7 * 4 * n_all / bw
    model_muon = ns / mm_rate + (5 * 4 * n_muon + 7 * 4 * (n_all - n_muon)) / bw
    return {"params": n_all, "muon_params": n_muon, "muon_tensors": labels.count("muon"), "ns_flops": ns,
            "adamw_s": t_adam, "muon_s": t_muon, "ratio": t_muon / t_adam, "model_adamw_s": model_adam,
            "model_muon_s": model_muon, "model_ratio": model_muon / model_adam}


def run(quick: bool = False) -> dict:
    shapes = SHAPES_QUICK if quick else SHAPES_FULL
    runs = 5 if quick else 10
    print(f"P5  Newton-Schulz ({N_ITERS} steps: 8 x (3.4445, -4.7750, 2.0315) + 2 x (2, -1.5, 0.5)), "
          f"v4jax optim.orthogonalize, f32, jitted; model = FLOPs / measured matmul FLOP/s at the same shapes")
    print(f"{'shape':>15} {'NS time':>10} {'GFLOP':>7} {'XLA x10':>9} {'matmul GF/s':>12} {'model':>10} "
          f"{'NS GF/s':>8} {'meas/model':>10}")
    rows = []
    for shape in shapes:
        r = measure_ns(shape, runs)
        rows.append(r)
        cf = f"{N_ITERS * r['compiled_flops'] / 1e9:9.3f}" if r["compiled_flops"] else f"{'n/a':>9}"
        print(f"{'x'.join(map(str, shape)):>15} {fmt_s(r['ns_s']):>10} {r['flops'] / 1e9:7.3f} {cf} "
              f"{r['matmul_gflops']:12.1f} {fmt_s(r['model_s']):>10} {r['achieved_gflops']:8.1f} {r['ratio']:10.3f}")
        print(f"{'':>15} per-matmul GFLOP/s: X X^T {r['rates']['xxt'] / 1e9:.1f}, A A {r['rates']['aa'] / 1e9:.1f}, "
              f"B X {r['rates']['bx'] / 1e9:.1f}")
    mm_rate = sum(r["flops"] for r in rows) / sum(r["model_s"] for r in rows)
    bw = memory_bandwidth(64 if quick else 128)
    opt = optimizer_step(runs, mm_rate, bw)
    print(f"  full update, tiny model ({opt['params'] / 1e6:.2f} M params, {opt['muon_tensors']} Muon tensors = "
          f"{opt['muon_params'] / 1e6:.2f} M, NS {opt['ns_flops'] / 1e9:.2f} GFLOP), donated, memory bw "
          f"{bw / 1e9:.1f} GB/s:")
    print(f"    v4jax make_optimizer (clip + Muon/AdamW) {fmt_s(opt['muon_s'])}, optax.adamw {fmt_s(opt['adamw_s'])} "
          f"-> Muon/AdamW {opt['ratio']:.2f}x (model {fmt_s(opt['model_muon_s'])} / {fmt_s(opt['model_adamw_s'])} "
          f"= {opt['model_ratio']:.2f}x)")
    worst = max(rows, key=lambda r: abs(math.log(r["ratio"])))
    ok = all(LO <= r["ratio"] <= HI for r in rows)
    lines = [verdict("P5", ok, worst["ratio"],
                     f"worst NS measured/model over {len(rows)} shapes ({'x'.join(map(str, worst['shape']))}), "
                     f"target {LO}-{HI}; optimizer step Muon/AdamW {opt['ratio']:.1f}x, informational")]
    print(lines[0])
    return {"rows": rows, "optimizer": opt, "matmul_gflops": mm_rate / 1e9, "memory_bw": bw,
            "pass": bool(ok), "lines": lines}
