"""P4: MoE layer vs a dense SwiGLU of equal active parameters, T = 1 .. 16K tokens, f32.

MoE  = v4jax `Experts` (routed experts only: E = 16, k = 2, d = 512, F = 256), dispatch as "auto" picks it
       ("gather" when T*k < E, else "grouped": sorted row tiles, `moe_kernel` "jnp" on XLA:CPU);
dense = SwiGLU d -> k*F = 512 -> d with the same clamp: the same FLOPs per token as the MoE.
Routing (random scores, top-k, softmax weights) is made outside the timed function; both are jitted and
timed interleaved (one call of each per round, median of the rounds) because the 2-core CPU is shared.
Model: equal FLOPs -> ratio 1.0; the "grouped" dispatch computes its padded tiles, so the model ratio is
rows computed / (T*k) (the tile padding of the actual routing), the gather/scatter of rows not counted.

Decode (T = 1, "gather"): which bytes of the expert weights the computation reads, walked from the jaxpr
(a gather or dynamic slice of a weight reads its output's bytes, any other use the whole weight): must
equal k experts' weights exactly; XLA's own "bytes accessed" of the compiled program is shown beside all E experts' bytes.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax import grouped_matmul
from v4jax.config import ModelConfig
from v4jax.moe import Experts, swiglu

from .timing import fmt_s, time_paired, verdict

SHAPE = dict(d=512, f=256, E=16, k=2)
T_FULL = (1, 16, 256, 1024, 4096, 16384)
T_QUICK = (1, 64, 1024, 4096)
GATE = 1.5  # MoE time / dense time at the largest T


def _cfg() -> ModelConfig:
    return dataclasses.replace(ModelConfig.tiny(), hidden_size=SHAPE["d"], moe_intermediate_size=SHAPE["f"],
                               n_routed_experts=SHAPE["E"], num_experts_per_tok=SHAPE["k"], moe_impl="auto")


@functools.lru_cache(maxsize=None)
def _layers():
    """(graphdef, state) of the Experts, dense SwiGLU weights (w1, w3 [d, kF], w2 [kF, d])."""
    cfg = _cfg()
    gd, state = nnx.split(Experts(cfg, nnx.Rngs(0)))
    d, kf = SHAPE["d"], SHAPE["k"] * SHAPE["f"]
    ks = jax.random.split(jax.random.key(7), 3)
    dense = tuple(jax.random.normal(kk, s, jnp.float32) * s[0] ** -0.5
                  for kk, s in zip(ks, ((d, kf), (d, kf), (kf, d))))
    return gd, state, dense, cfg.swiglu_limit


def _routing(t: int, key):
    e, k = SHAPE["E"], SHAPE["k"]
    kx, ks = jax.random.split(key)
    top, idx = jax.lax.top_k(jax.random.normal(ks, (t, e)), k)
    return jax.random.normal(kx, (t, SHAPE["d"])), jax.nn.softmax(top, axis=-1), idx.astype(jnp.int32)


@functools.lru_cache(maxsize=None)
def _moe_fn(impl: str):
    gd = _layers()[0]
    return jax.jit(lambda state, x, r, idx: getattr(nnx.merge(gd, state), impl)(x, r, idx))


@functools.lru_cache(maxsize=None)
def _dense_fn():
    limit = _layers()[3]
    return jax.jit(lambda w, x: swiglu(x @ w[0], x @ w[1], limit) @ w[2])


def _pad_ratio(impl: str, idx) -> float:
    """Rows the dispatch computes / useful rows (T*k); 1 for "gather"."""
    if impl != "grouped":
        return 1.0
    a = idx.size
    lay = grouped_matmul.layout(idx, SHAPE["E"], grouped_matmul.tile_rows(a, SHAPE["E"], "jnp"))
    return int(lay["live_n"].sum()) * lay["tm"] / a


def measure(t: int, runs: int) -> dict:
    gd, state, dense, _ = _layers()
    x, r, idx = _routing(t, jax.random.key(t))
    impl = nnx.merge(gd, state).choose("auto", t, SHAPE["k"])
    moe, den = _moe_fn(impl), _dense_fn()
    t_moe, t_dense = time_paired(lambda: moe(state, x, r, idx), lambda: den(dense, x), runs)
    return {"T": t, "impl": impl, "moe_s": t_moe, "dense_s": t_dense, "ratio": t_moe / t_dense,
            "model": _pad_ratio(impl, idx)}


def _weight_bytes_read(jaxpr, weights: set) -> float:
    """Bytes of the `weights` vars the jaxpr reads: a gather or dynamic slice reads its output's bytes, a
    sub-jaxpr is followed (a scan body counted `length` times), any other use reads the whole weight."""
    total = 0.0
    for eqn in jaxpr.eqns:
        used = [v for v in eqn.invars if not isinstance(v, jex_core.Literal) and v in weights]
        if not used:
            continue
        sub = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
        if sub is not None:
            sub = getattr(sub, "jaxpr", sub)
            inner = {iv for iv, ov in zip(sub.invars, eqn.invars) if ov in used}
            total += _weight_bytes_read(sub, inner) * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
        elif eqn.primitive.name in ("gather", "dynamic_slice"):
            total += sum(np.prod(o.aval.shape) * o.aval.dtype.itemsize for o in eqn.outvars)
        else:
            total += sum(np.prod(v.aval.shape) * v.aval.dtype.itemsize for v in used)
    return float(total)


def decode_bytes() -> dict:
    """T = 1 through "auto" (= "gather"): expert-weight bytes read (jaxpr walk) and XLA's bytes accessed."""
    gd, state, _, _ = _layers()
    x, r, idx = _routing(1, jax.random.key(1))
    impl = nnx.merge(gd, state).choose("auto", 1, SHAPE["k"])
    leaves = jax.tree.leaves(state)
    fn = lambda st, x, r, idx: getattr(nnx.merge(gd, st), impl)(x, r, idx)  # noqa: E731
    closed = jax.make_jaxpr(fn)(state, x, r, idx)
    weights = set(closed.jaxpr.invars[: len(leaves)])
    # the compiled program's figure (the lowered one counts a dynamic slice's whole operand)
    ca = jax.jit(fn).lower(state, x, r, idx).compile().cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    per_expert = sum(leaf.size * leaf.dtype.itemsize for leaf in leaves) / SHAPE["E"]
    return {"impl": impl, "weight_bytes_read": _weight_bytes_read(closed.jaxpr, weights),
            "xla_bytes_accessed": float(ca.get("bytes accessed", float("nan"))),
            "k_experts_bytes": SHAPE["k"] * per_expert, "all_experts_bytes": SHAPE["E"] * per_expert}


def run(quick: bool = False) -> dict:
    ts = T_QUICK if quick else T_FULL
    s = SHAPE
    print(f"P4  MoE layer (routed experts E={s['E']}, k={s['k']}, d={s['d']}, F={s['f']}, v4jax Experts, moe_impl "
          f"auto) vs dense SwiGLU d={s['d']} -> {s['k'] * s['f']}, f32; CPU shared with other jobs")
    print(f"{'T':>6} {'impl':>8} {'dense':>11} {'MoE':>11} {'MoE/dense':>10} {'model':>6}")
    rows = []
    for t in ts:
        row = measure(t, runs=5)
        print(f"{t:6d} {row['impl']:>8} {fmt_s(row['dense_s']):>11} {fmt_s(row['moe_s']):>11} "
              f"{row['ratio']:9.2f}x {row['model']:5.2f}x", flush=True)
        rows.append(row)
    dec = decode_bytes()
    mb = 2 ** 20
    print(f"decode T=1 ({dec['impl']}): expert-weight bytes read {dec['weight_bytes_read'] / mb:.2f} MiB = "
          f"{dec['weight_bytes_read'] / dec['k_experts_bytes']:.2f} x k={s['k']} experts "
          f"({dec['k_experts_bytes'] / mb:.2f} MiB); all {s['E']} experts {dec['all_experts_bytes'] / mb:.2f} MiB; "
          f"XLA bytes accessed (compiled) {dec['xla_bytes_accessed'] / mb:.2f} MiB")
    return _verdicts(rows, dec)


def _verdicts(rows, dec) -> dict:
    last = rows[-1]
    ok_time = last["ratio"] <= GATE
    ok_bytes = (dec["weight_bytes_read"] == dec["k_experts_bytes"]
                and dec["xla_bytes_accessed"] < 0.5 * dec["all_experts_bytes"])
    lines = [verdict("P4", ok_time and ok_bytes, last["ratio"],
                     f"MoE/dense {last['ratio']:.2f}x <= {GATE}x at T={last['T']} ({last['impl']}; model "
                     f"{last['model']:.2f}x); decode reads {dec['weight_bytes_read'] / dec['k_experts_bytes']:.2f} x "
                     f"k experts' weights = {dec['weight_bytes_read'] / dec['all_experts_bytes']:.3f} of all E: "
                     f"{ok_bytes}"),
             f"    P4 detail: measured/model at T={last['T']} {last['ratio'] / last['model']:.2f}; XLA bytes accessed "
             f"at T=1 = {dec['xla_bytes_accessed'] / dec['all_experts_bytes']:.2f} of all experts' weights"]
    for ln in lines:
        print(ln)
    return {"rows": rows, "decode": dec, "pass": bool(ok_time and ok_bytes), "lines": lines}
