"""P3: prefill/training attention of ONE layer vs S: compiled forward FLOPs, fwd+bwd time, compiled temp memory.

CSA (ratio 4, indexer 4 heads x 64, top-k 512), HCA (ratio 128) and SWA (ratio 0: window only) all run
v4jax's own `attention.attend_sequence` (the function the model runs for every sequence) with the
training path's query block `ModelConfig.attn_block` = 128, window 128, n_h 8 x d_h 128, f32, batch 1;
prefill of S tokens from an empty state: T = S queries, start 0, empty window rows, N = S / m random
compressed entries (segment 0) and index keys. The dense baseline is a plain blocked causal MQA written
here (K = V shared, same heads, same 128-query blocks; key blocks entirely above the diagonal are
skipped, so it computes S (S + 128) / 2 query-key pairs, 1 + 128/S times the ideal S^2/2).

FLOPs: `cost_analysis()` of the compiled forward. XLA counts a while loop's body ONCE, and
attend_sequence runs its query blocks with `lax.map` (a while loop), so a sparse kind's forward FLOPs
are counted per block (T = block queries against the entries its group scores: the blocks of a group
have the same static shapes, so the same FLOPs; checked against an unrolled copy within 0.6 %).
The dense baseline is unrolled in Python: its count is direct.

What attend_sequence computes (model.blocked_prefill_flops gives it exactly; compiled FLOPs match it
within 1 %, the rest is softmax/mask element-wise work) is close to the §1 model by construction:
the window band is scored in sub-blocks of WINDOW_SUB = 16 queries against their own 16 + 128 keys
((16 + 128) / 128 = 1.125x the model's 128 per query; one 128-query slab of 256 keys would be 2x),
and a whole sequence's query blocks run in CAUSAL_GROUPS = 8 groups, group g scoring only the first
N (g+1)/8 compressed entries (the indexer and HCA: 1.125x the causal half instead of 2x). Sparse
kinds' FLOPs are summed group by group (blocks in the group x one block against its entries).

Memory: `memory_analysis().temp_size_in_bytes` of the compiled fwd+bwd (grad of sum(o) w.r.t. q, kv
and the compressed entries); linear growth (temp(2S)/temp(S) <= 2.3, the threshold of
tests/test_sparse_memory.py) and no HLO buffer pairing S with S or S/m are the checks for "no S x S or
S x S/m buffer"; the dense baseline's temp grows ~4x per doubling for contrast. CSA's check starts at
S = k m = 2048 (below it the gathered min(k, S/4) entries per query grow with S). CSA's largest
residual is the stacked gathered values [S/Q, Q, k, c]: S k c floats, linear but large.

Time: median of 5 fwd+bwd runs (compiled ahead, so compile excluded; --quick: no warm-up, S = 1K only).
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp

from v4jax.attention import CAUSAL_GROUPS, WINDOW_SUB, _block_groups, attend_sequence

from . import model
from .timing import fmt_s, time_fn, verdict

SHAPE = dict(n_heads=8, head_dim=128, idx_heads=4, idx_dim=64, topk=512, window=128, block=128)
RATIO = {"csa": 4, "hca": 128, "swa": 0}
KINDS = ("dense", "csa", "hca", "swa")
S_QUICK = (1024, 2048, 4096)
S_FULL = (2048, 4096, 8192, 16384)
# fwd+bwd is timed up to this S (larger S: compiled FLOPs and memory only). Dense at 16K is ~2e12 FLOPs and
# CSA at 2K already takes ~7 s per fwd+bwd here (per-query gathers of k x c values), so --quick times S = 1K only
TIME_MAX = {True: 1024, False: 8192}
FLOP_TOL = 0.15  # spec: FLOP ratios within +-15 % of §1
LINEAR_MAX = 2.3  # temp(2S) / temp(S) above this is not linear
HLO_SHAPE = re.compile(r"\b(?:f|bf|s|u|pred)(?:\d+)?\[([\d,]+)\]")


def _inputs(kind: str, S: int, T: int, key) -> tuple:
    """-> (diff = (q [T,H,c], kv [T,c], entries [N,c] | None), rest = (win, entry segs, index, seg, sink))."""
    h, c, hi, di, w = (SHAPE[k] for k in ("n_heads", "head_dim", "idx_heads", "idx_dim", "window"))
    ks = jax.random.split(key, 6)
    q = jax.random.normal(ks[0], (T, h, c), jnp.float32)
    kv = jax.random.normal(ks[1], (T, c), jnp.float32)
    n = S // RATIO[kind] if RATIO.get(kind) else 0
    ent = jax.random.normal(ks[2], (n, c), jnp.float32) if n else None
    cseg = jnp.zeros((n,), jnp.int32) if n else None
    index = None
    if kind == "csa":
        index = (jax.random.normal(ks[3], (T, hi, di), jnp.float32),  # indexer queries [T, HI, dI]
                 jax.random.uniform(ks[4], (T, hi), jnp.float32),  # head weights [T, HI]
                 jax.random.normal(ks[5], (n, di), jnp.float32))  # index keys [N, dI]
    win = jnp.zeros((w, c), jnp.float32)  # empty state window (masked: start = 0)
    return (q, kv, ent), (win, cseg, index, jnp.zeros((T,), jnp.int32), jnp.zeros((h,), jnp.float32))


def _dense(q_thc, kv_tc, *, block: int, scale: float):
    """Blocked causal MQA, K = V: query block b vs keys 0 .. (b+1)Q - 1 (blocks above the diagonal skipped)."""
    t = q_thc.shape[0]
    outs = []
    for b in range(-(-t // block)):
        j0, j1 = b * block, min((b + 1) * block, t)
        k = kv_tc[:j1]  # [j1, c]
        lg = jnp.einsum("qhc,kc->qhk", q_thc[j0:j1], k, precision="highest") * scale  # [Q, H, j1]
        ok = jnp.arange(j1)[None, :] <= (j0 + jnp.arange(j1 - j0))[:, None]  # [Q, j1]
        p = jax.nn.softmax(jnp.where(ok[:, None, :], lg, -jnp.inf), axis=-1)
        outs.append(jnp.einsum("qhk,kc->qhc", p, k, precision="highest"))
    return jnp.concatenate(outs, axis=0)  # [T, H, c]


def _groups(kind: str, S: int) -> int:
    """The query-block groups the model uses for a whole sequence from position 0 (Attention.core)."""
    nblk = S // SHAPE["block"]
    return CAUSAL_GROUPS if RATIO.get(kind) and nblk >= CAUSAL_GROUPS else 1


def _attend(kind: str, S: int = 0):
    """-> f(diff, rest) = attention output [T, H, c] of `kind`."""
    scale = SHAPE["head_dim"] ** -0.5
    if kind == "dense":
        return lambda d, r: _dense(d[0], d[1], block=SHAPE["block"], scale=scale)
    fn = functools.partial(attend_sequence, window=SHAPE["window"], ratio=RATIO[kind], block=SHAPE["block"],
                           topk=SHAPE["topk"], scale=scale, groups=_groups(kind, S))

    def f(d, r):
        (q, kv, ent), (win, cseg, index, seg, sink) = d, r
        return fn(q, kv, win, None if ent is None else (ent, cseg), index, jnp.int32(0), seg, sink)[0]
    return f


def _compiled_flops(kind: str, S: int, T: int) -> float:
    args = _inputs(kind, S, T, jax.random.key(0))
    ca = jax.jit(_attend(kind)).lower(*args).compile().cost_analysis()
    return (ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"]


def fwd_flops(kind: str, S: int) -> float:
    """Compiled forward FLOPs. Sparse kinds: sum over the model's block groups of (blocks in the group)
    x one block against the entries that group scores (XLA counts a loop body once)."""
    if kind == "dense":
        return _compiled_flops(kind, S, S)
    blk = SHAPE["block"]
    return sum((b1 - b0) * _compiled_flops(kind, b1 * blk if _groups(kind, S) > 1 else S, blk)
               for b0, b1 in _block_groups(S // blk, _groups(kind, S)))


def _fwd_bwd(kind: str, S: int):
    f = _attend(kind, S)
    return jax.jit(jax.grad(lambda d, r: jnp.sum(f(d, r)), argnums=0))  # grads of q, kv, entries


def _hlo_check(text: str, S: int, kind: str) -> dict:
    """Buffers in the compiled HLO: does any pair S with S (or with S/m)? and the largest one (elements)."""
    dims = [tuple(int(x) for x in m.split(",")) for m in set(HLO_SHAPE.findall(text)) if m]
    m = RATIO.get(kind) or 1
    widths = {SHAPE[k] for k in SHAPE} | {SHAPE["block"] + SHAPE["window"]}
    bad = []
    for d in dims:
        rest = list(d)
        if S in rest:
            rest.remove(S)
            if S in rest or (S // m in rest and S // m not in widths):
                bad.append(d)
    largest = max(int(jnp.prod(jnp.array(d))) for d in dims)
    return {"quadratic_buffers": [list(b) for b in bad], "largest_elems": largest}


def fwd_bwd(kind: str, S: int, timed: bool, warmup: int) -> dict:
    args = jax.block_until_ready(_inputs(kind, S, S, jax.random.key(S)))
    comp = _fwd_bwd(kind, S).lower(*args).compile()
    out = {"temp_bytes": comp.memory_analysis().temp_size_in_bytes, **_hlo_check(comp.as_text(), S, kind)}
    out["time_s"] = time_fn(comp, *args, runs=5, warmup=warmup)["median_s"] if timed else None
    return out


def measure(S: int, quick: bool) -> dict:
    kw = dict(n_heads=SHAPE["n_heads"], head_dim=SHAPE["head_dim"], topk=SHAPE["topk"], window=SHAPE["window"],
              idx_heads=SHAPE["idx_heads"], idx_dim=SHAPE["idx_dim"])
    row = {"S": S}
    for kind in KINDS:
        r = {"flops": fwd_flops(kind, S), "model_flops": model.layer_prefill_flops(kind, S, **kw),
             "blocked_flops": model.blocked_prefill_flops(kind, S, block=SHAPE["block"], groups=_groups(kind, S), sub=WINDOW_SUB, **kw),
             **fwd_bwd(kind, S, S <= TIME_MAX[quick], warmup=0 if quick else 1)}
        row[kind] = r
    d = row["dense"]
    for kind in KINDS[1:]:
        r = row[kind]
        r["ratio"] = r["flops"] / d["flops"]
        r["model_ratio"] = r["model_flops"] / d["model_flops"]
        r["blocked_ratio"] = r["blocked_flops"] / d["blocked_flops"]
        r["time_ratio"] = r["time_s"] / d["time_s"] if d["time_s"] else None
    return row


def _gb(x):
    return f"{x / 2 ** 20:9.1f}M"


def _print_row(row):
    d = row["dense"]
    t = fmt_s(d["time_s"]) if d["time_s"] else "-"
    print(f"{row['S']:6d} dense {d['flops'] / 1e9:8.2f}G {'1':>6} {'1':>6} {'1':>6} {t:>10} {'':>6} {_gb(d['temp_bytes'])}")
    for kind in KINDS[1:]:
        r = row[kind]
        tr = f"{r['time_ratio']:.3f}" if r["time_ratio"] else "-"
        t = fmt_s(r["time_s"]) if r["time_s"] else "-"
        print(f"{'':6} {kind:5} {r['flops'] / 1e9:8.2f}G {r['ratio']:6.3f} {r['model_ratio']:6.3f} "
              f"{r['blocked_ratio']:6.3f} {t:>10} {tr:>6} {_gb(r['temp_bytes'])}")


def run(quick: bool = False) -> dict:
    Ss = S_QUICK if quick else S_FULL
    print("P3  prefill attention, one layer (8 x 128 heads, indexer 4 x 64, k 512, window 128, block 128), f32, "
          "v4jax attend_sequence; dense = blocked causal MQA")
    print("       kind   fwd FLOPs  ratio  model blockd  fwd+bwd t  t/dns  temp (fwd+bwd)")
    rows = []
    for S in Ss:
        row = measure(S, quick)
        _print_row(row)
        rows.append(row)
    return _verdicts(rows)


def _growth(rows, kind):
    """temp(2S) / temp(S); CSA only from S = k m on (below it the gathered min(k, S/m) entries grow with S)."""
    lo = SHAPE["topk"] * RATIO["csa"] if kind == "csa" else 0
    return [b[kind]["temp_bytes"] / a[kind]["temp_bytes"] for a, b in zip(rows, rows[1:])
            if b["S"] == 2 * a["S"] and a["S"] >= lo]


def _verdicts(rows) -> dict:
    dev = {(r["S"], k): r[k]["ratio"] / r[k]["model_ratio"] for r in rows for k in KINDS[1:]}
    worst = max(dev, key=lambda x: abs(dev[x] - 1))
    flops_ok = all(abs(v - 1) <= FLOP_TOL for v in dev.values())
    growth = {k: _growth(rows, k) for k in KINDS}
    quad = {(r["S"], k): r[k]["quadratic_buffers"] for r in rows for k in KINDS[1:] if r[k]["quadratic_buffers"]}
    mem_ok = all(g <= LINEAR_MAX for k in KINDS[1:] for g in growth[k]) and not quad
    for k in KINDS:
        big = ", ".join(f"{r['S']}: {r[k]['temp_bytes'] / (r['S'] ** 2 / (RATIO.get(k) or 1) * 4):.2f}" for r in rows)
        print(f"    temp growth per doubling {k:5}: " + " ".join(f"{g:.2f}" for g in growth[k])
              + f"   temp / (S*S/m*4 B) {big}")
    note = (f"worst compiled/model FLOP ratio {dev[worst]:.2f} ({worst[1].upper()} S={worst[0]}), tolerance "
            f"+-{FLOP_TOL:.0%}; temp linear (<= {LINEAR_MAX}x per doubling) and no S x S/m buffer: {mem_ok}")
    lines = [verdict("P3", flops_ok and mem_ok, dev[worst], note)]
    if quad:
        lines.append(f"    P3 detail: buffers pairing S with S/m: {quad}")
    for ln in lines:
        print(ln)
    return {"rows": rows, "temp_growth": growth, "flops_ok": flops_ok, "memory_ok": mem_ok,
            "pass": bool(flops_ok and mem_ok), "lines": lines}
