"""P7: end-to-end tiny-model decode tokens/s with v4jax's Engine at L = 4K and 32K, vs a roofline floor.

The Engine holds a preallocated, donated decode state. We prefill random tokens to L with the engine
(chunked prefill), then time single-token `Engine.decode` calls (greedy, batch 1; each call includes
the engine's host-side bookkeeping and the sampled token's transfer: this is the end-to-end step).

Floor = bytes one decode step must read / measured memory bandwidth (donated jitted x + 1 copy):
  parameters actually used (main layers; routed experts scaled by top-k / n_experts; one embedding
  row; MTP block excluded: not speculative) + state rows actually read (windows, compressor tails,
  HCA: all L/m entries, CSA: the L/4 indexer keys + top-k gathered entries).
--quick uses the tiny config with index_n_heads = 1 (with the 8-head indexer, chunked prefill to 32K
took ~100 s on this 2-core CPU); the full run uses the tiny config as is. Prefill runs in one chunk per
context (one compile each), attn_block 512.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from v4jax.config import ModelConfig
from v4jax.engine import Engine
from v4jax.model import build
from v4jax.sampling import SamplingConfig

from .timing import fmt_s, memory_bandwidth, time_calls, time_stateful, verdict

CONTEXTS = (4096, 32768)
TARGET = 5.0


def _config(quick: bool):
    # attn_block only sizes the prefill's query blocks (decode runs one query): 512 prefills faster here
    cfg = ModelConfig.tiny(attn_block=512)
    return dataclasses.replace(cfg, index_n_heads=1) if quick else cfg


def param_bytes_read(model, cfg) -> float:
    """Bytes of the parameters one batch-1 decode step reads (see module docstring)."""
    total = 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        nbytes = leaf.size * leaf.dtype.itemsize
        if keys[0] == "mtp":
            continue
        if keys[0] == "embed":
            nbytes = nbytes / cfg.vocab_size
        elif "experts" in keys and "shared_experts" not in keys:
            nbytes = nbytes * cfg.num_experts_per_tok / cfg.n_routed_experts
        total += nbytes
    return total


def _rows_bytes(tree, n_rows: int) -> float:
    return sum(x.size * x.dtype.itemsize / x.shape[1] * n_rows for x in jax.tree.leaves(tree))


def _all_bytes(tree) -> float:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def state_bytes_read(state, cfg, L: int, dense: bool = False) -> float:
    """Decode-state bytes read at context L (batch 1). dense=True: a dense twin reading L rows per layer."""
    total = 0.0
    for i, st in enumerate(state["layers"]):
        r = cfg.layer_ratio(i)
        row = _rows_bytes(st["win"], 1)
        if dense:
            total += row * L
            continue
        total += _all_bytes(st["win"])
        for part in ("comp", "index"):
            if part not in st:
                continue
            total += sum(_all_bytes(v) for k, v in st[part].items() if k != "kv")
            n = L // (4 if part == "index" else r)
            n = min(cfg.index_topk, n) if (part == "comp" and r == 4) else n
            total += _rows_bytes(st[part]["kv"], n)
    return total


def _decode_timer(eng, sampling):
    key = jax.random.key(0)
    tok = np.array([3])

    def step():
        nonlocal tok
        tok, _ = eng.decode(tok, sampling, key)

    return step


def _jit_step_s(eng, sampling) -> float:
    """Diagnostic: the compiled decode step alone (donated state threaded through), no engine bookkeeping.
    Uses the engine's own jitted step (engine._decode_fn) at the bucket the next decode would use."""
    from v4jax.engine import _decode_fn

    fn = eng.step_fn(_decode_fn, eng.bucket(int(eng.pos[0]) + 1))
    ctl = jax.numpy.asarray([[3], eng.pos, [1]], jax.numpy.int32)  # token, position, active
    key, knobs = jax.random.key(0), eng.knobs(sampling)

    def step(carry):
        state, pend = carry
        _, _, pend, state = fn(eng.param_leaves, ctl, state, pend, key, *knobs)
        return state, pend

    summ, (eng.state, eng.pend_h) = time_stateful(step, (eng.state, eng.pend_h), runs=10, warmup=2)
    return summ["median_s"]


def run(quick: bool = False) -> dict:
    cfg = _config(quick)
    bw = memory_bandwidth()
    eng = Engine(build(cfg), max_context=max(CONTEXTS) + 64, prefill_chunk=max(CONTEXTS))
    pbytes = param_bytes_read(eng.model, cfg)
    print(f"P7  tiny-model decode (index_n_heads={cfg.index_n_heads}, layers {cfg.num_hidden_layers}, "
          f"dim {cfg.dim}), batch 1, f32; memory bandwidth {bw / 1e9:.1f} GB/s; params read {pbytes / 1e6:.2f} MB")
    rng, sampling, rows = np.random.default_rng(0), SamplingConfig(), []
    for L in CONTEXTS:
        n = L - int(eng.pos[0])
        eng.prefill([rng.integers(2, cfg.vocab_size, n)])
        t = time_calls(_decode_timer(eng, sampling), runs=10, warmup=2)["median_s"]
        tj = _jit_step_s(eng, sampling)  # same position again: context stays L (contents: random anyway)
        sbytes = state_bytes_read(eng.state, cfg, L)
        floor = (pbytes + sbytes) / bw
        dense_floor = (pbytes + state_bytes_read(eng.state, cfg, L, dense=True)) / bw
        rows.append({"L": L, "step_s": t, "tokens_per_s": 1 / t, "floor_s": floor, "ratio": t / floor,
                     "state_bytes": sbytes, "dense_twin_floor_s": dense_floor, "jit_step_s": tj,
                     "jit_ratio": tj / floor})
        print(f"  L={L:6d}: {fmt_s(t)}/token = {1 / t:8.1f} tok/s; floor {fmt_s(floor)} "
              f"(state read {sbytes / 1e6:.2f} MB) -> measured/floor {t / floor:.2f}; jitted step alone {fmt_s(tj)} ({tj / floor:.2f}x floor); "
              f"dense-twin floor {fmt_s(dense_floor)}")
    return _verdicts(rows)


def _verdicts(rows) -> dict:
    worst = max(r["ratio"] for r in rows)
    g = rows[-1]["step_s"] / rows[0]["step_s"]
    gd = rows[-1]["dense_twin_floor_s"] / rows[0]["dense_twin_floor_s"]
    gm = rows[-1]["floor_s"] / rows[0]["floor_s"]
    lines = [verdict("P7", worst <= TARGET, worst, f"worst measured/floor over L, target <= {TARGET:.0f}x"),
             f"    P7 detail: time/token growth {rows[0]['L']}->{rows[-1]['L']}: measured {g:.2f}x, "
             f"model floor {gm:.2f}x, dense-twin floor {gd:.2f}x"]
    for ln in lines:
        print(ln)
    return {"rows": rows, "pass": bool(worst <= TARGET), "growth": g, "dense_twin_growth": gd, "lines": lines}
