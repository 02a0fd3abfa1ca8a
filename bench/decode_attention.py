"""P2: decode attention time per token, ONE layer, CSA / HCA vs dense MQA, L = 4K .. 128K.

All three run v4jax's own `attention.attend_sequence` for one query (T = 1, block 1) on state-shaped,
preallocated f32 inputs, jitted (inputs are read-only: nothing to donate):
  CSA    ratio 4:   indexer scores over L/4 keys (`index_scores`) -> top-k gather -> attention
                    over top-k + window 128 (`_compressed_branch`)
  HCA    ratio 128: all L/128 entries + window 128
  dense  ratio 1:   all L keys + window, i.e. dense MQA with the same heads and V4's shared K = V
Layer shape = V4-Flash: 64 query heads x head_dim 512, indexer 64 heads x 128, top-k 512, window 128.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from v4jax.attention import attend_sequence

from . import model
from .timing import fmt_s, time_fn, verdict

SHAPE = dict(n_heads=64, head_dim=512, idx_heads=64, idx_dim=128, topk=512, window=128)
RATIO = {"csa": 4, "hca": 128, "dense": 1}
L_FULL = (4096, 16384, 32768, 65536, 131072)
L_QUICK = (4096, 16384, 32768, 131072)  # 128K is cheap enough even in --quick
MONO_TOL = 0.10  # speedups may dip by at most 10 % between neighbouring L (timing noise on a shared CPU)


def _inputs(kind: str, L: int, key) -> tuple:
    h, c, hi, di, w = (SHAPE[k] for k in ("n_heads", "head_dim", "idx_heads", "idx_dim", "window"))
    n = L // RATIO[kind]
    ks = jax.random.split(key, 7)
    q = jax.random.normal(ks[0], (1, h, c), jnp.float32)
    kv = jax.random.normal(ks[1], (1, c), jnp.float32)
    win = jax.random.normal(ks[2], (w, c), jnp.float32)
    comp = (jax.random.normal(ks[3], (n, c), jnp.float32), jnp.zeros((n,), jnp.int32))
    index = None
    if kind == "csa":
        index = (jax.random.normal(ks[4], (1, hi, di), jnp.float32),
                 jax.random.uniform(ks[5], (1, hi), jnp.float32),
                 jax.random.normal(ks[6], (n, di), jnp.float32))
    start = jnp.int32(L)
    seg = jnp.zeros((1,), jnp.int32)
    sink = jnp.zeros((h,), jnp.float32)
    return q, kv, win, comp, index, start, seg, sink


@functools.lru_cache(maxsize=None)
def _step(kind: str):
    fn = functools.partial(attend_sequence, window=SHAPE["window"], ratio=RATIO[kind], block=1,
                           topk=SHAPE["topk"], scale=SHAPE["head_dim"] ** -0.5)
    return jax.jit(lambda *a: fn(*a)[0])


def measure(L: int, runs: int) -> dict:
    out = {}
    for i, kind in enumerate(("dense", "csa", "hca")):
        args = jax.block_until_ready(_inputs(kind, L, jax.random.key(L + i)))
        out[kind] = time_fn(_step(kind), *args, runs=runs)["median_s"]
        del args
    return out


def _cost_kw():
    return dict(n_heads=SHAPE["n_heads"], head_dim=SHAPE["head_dim"], topk=SHAPE["topk"], window=SHAPE["window"],
                idx_heads=SHAPE["idx_heads"], idx_dim=SHAPE["idx_dim"])


def _monotonic(xs) -> bool:
    return all(b >= a * (1 - MONO_TOL) for a, b in zip(xs, xs[1:]))


def run(quick: bool = False) -> dict:
    Ls = L_QUICK if quick else L_FULL
    print("P2  decode attention per token, one Flash-shaped layer (64 x 512 heads, indexer 64 x 128, k 512, "
          "window 128), f32, v4jax attend_sequence")
    print(f"{'L':>7} {'dense':>10} {'CSA':>10} {'HCA':>10} {'dense/CSA':>10} {'model':>7} {'dense/HCA':>10} {'model':>7}")
    rows = []
    for L in Ls:
        t = measure(L, runs=5)
        s_csa, s_hca = t["dense"] / t["csa"], t["dense"] / t["hca"]
        p_csa, p_hca = (model.predicted_speedup(k, L, **_cost_kw()) for k in ("csa", "hca"))
        print(f"{L:7d} {fmt_s(t['dense']):>10} {fmt_s(t['csa']):>10} {fmt_s(t['hca']):>10} "
              f"{s_csa:9.2f}x {p_csa:6.1f}x {s_hca:9.2f}x {p_hca:6.1f}x")
        rows.append({"L": L, "dense_s": t["dense"], "csa_s": t["csa"], "hca_s": t["hca"], "speedup_csa": s_csa,
                     "speedup_hca": s_hca, "model_csa": p_csa, "model_hca": p_hca})
    return _verdicts(rows, quick)


def _verdicts(rows, quick) -> dict:
    last = rows[-1]
    mono = _monotonic([r["speedup_csa"] for r in rows]) and _monotonic([r["speedup_hca"] for r in rows])
    at = f"L={last['L']}" + ("" if last["L"] >= 131072 else ", 128K not run in --quick: thresholds checked here")
    ok_csa = last["speedup_csa"] >= 5 and mono
    ok_hca = last["speedup_hca"] >= 10 and mono
    lines = [verdict("P2", ok_csa and ok_hca, last["speedup_csa"] / 5,
                     f"CSA {last['speedup_csa']:.1f}x >= 5x, HCA {last['speedup_hca']:.1f}x >= 10x at {at}; "
                     f"speedup grows with L: {mono}"),
             f"    P2 detail: CSA ratio={last['speedup_csa'] / 5:.3f} of 5x, HCA ratio={last['speedup_hca'] / 10:.3f} "
             f"of 10x, measured/model CSA {last['speedup_csa'] / last['model_csa']:.2f}, "
             f"HCA {last['speedup_hca'] / last['model_hca']:.2f}"]
    for ln in lines:
        print(ln)
    return {"rows": rows, "monotonic": mono, "pass": bool(ok_csa and ok_hca), "lines": lines}
