"""Storage layouts of the decode state's KV rows (spec §10 "KV precision", §11.1).

A *store* holds rows of width c along its second-to-last axis ([..., N, c] for plain arrays):
  plain   one array in the compute dtype or bfloat16;
  "fp8"   main-attention rows (window and compressed entries), the serving layout:
            nope  [..., N, c - rd]   float8_e4m3fn, blocks of 64 with one UE8M0 scale each
            scale [..., N, (c-rd)/64] uint8 UE8M0 exponents (7 for c - rd = 448: a 583-byte entry;
                                     SGLang pads it to 584 for alignment, v4jax stores no pad)
            rope  [..., N, rd]       bfloat16
          indexer keys (compressed, Hadamard-rotated):
            fp4   [..., N, c / 2]    uint8, two e2m1 nibbles per byte (even element = low nibble)
            scale [..., N, c / 32]   uint8 UE8M0, one per block of 32
Quantisation uses the official rounding (`quant.fp8_sim` / `fp4_sim`: power-of-two scales from the
block amax), so a row that was already simulated (`qat_sim`) is stored exactly.

Every function works on one store whatever its layout; callers never branch on it. Row scatters and
window shifts act on every leaf along the row axis.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import quant

LAYOUTS = (None, "bfloat16", "float32", "fp8")
FP8_BLOCK, FP4_BLOCK = 64, 32
_E2M1 = jnp.asarray(quant.E2M1_VALUES)


def check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"unknown KV layout '{layout}': use one of fp8, bfloat16, float32")
    return layout


def empty(shape, dtype, layout, kind: str, rd: int):
    """Zero store for rows of `shape` = (..., N, c); kind "main" (window / entries) or "index" (keys)."""
    check_layout(layout)
    *lead, n, c = shape
    if layout != "fp8":
        return jnp.zeros(shape, dtype if layout is None else jnp.dtype(layout))
    if kind == "index":
        return {"fp4": jnp.zeros((*lead, n, c // 2), jnp.uint8),
                "scale": jnp.zeros((*lead, n, c // FP4_BLOCK), jnp.uint8)}
    nope = c - rd
    if nope % FP8_BLOCK:
        raise ValueError(f"fp8 KV layout needs head_dim - qk_rope_head_dim to be a multiple of 64, got {nope}")
    return {"nope": jnp.zeros((*lead, n, nope), jnp.float8_e4m3fn),
            "scale": jnp.zeros((*lead, n, nope // FP8_BLOCK), jnp.uint8),
            "rope": jnp.zeros((*lead, n, rd), jnp.bfloat16)}


def is_quantised(store) -> bool:
    return isinstance(store, dict)


def length(store) -> int:
    """Number of rows N."""
    return jax.tree.leaves(store)[0].shape[-2]


def compute_dtype(store, default):
    return default if is_quantised(store) else store.dtype


# ---------------------------------------------------------------- scale bytes
def _scale_to_byte(s):
    """power-of-two float32 scales -> UE8M0 exponent bytes."""
    return ((jax.lax.bitcast_convert_type(s.astype(jnp.float32), jnp.uint32) >> 23) & 0xFF).astype(jnp.uint8)


def _byte_to_scale(b):
    return jax.lax.bitcast_convert_type(b.astype(jnp.uint32) << 23, jnp.float32)


# ---------------------------------------------------------------- encode / decode
def encode(x_nc, like):
    """Rows [..., N, c] -> a store of the same layout as `like`."""
    if not is_quantised(like):
        return x_nc.astype(like.dtype)
    if "fp4" in like:
        _, q, s = quant.fp4_sim(x_nc.astype(jnp.float32), FP4_BLOCK, return_scale=True)
        v = q.astype(jnp.float32)
        code = jnp.argmax(jnp.abs(v)[..., None] == _E2M1[:8], axis=-1).astype(jnp.uint8)
        code = code + jnp.where(v < 0, 8, 0).astype(jnp.uint8)
        return {"fp4": code[..., 0::2] | (code[..., 1::2] << 4), "scale": _scale_to_byte(s)}
    nope = like["nope"].shape[-1]
    _, q, s = quant.fp8_sim(x_nc[..., :nope].astype(jnp.float32), FP8_BLOCK, return_scale=True)
    return {"nope": q, "scale": _scale_to_byte(s), "rope": x_nc[..., nope:].astype(jnp.bfloat16)}


def decode(store, dtype):
    """A store -> rows [..., N, c] in `dtype`."""
    if not is_quantised(store):
        return store.astype(dtype)
    if "fp4" in store:
        p = store["fp4"]
        codes = jnp.stack([p & 0xF, p >> 4], axis=-1).reshape(p.shape[:-1] + (2 * p.shape[-1],))
        s = jnp.repeat(_byte_to_scale(store["scale"]), FP4_BLOCK, axis=-1)
        return (_E2M1[codes.astype(jnp.int32)] * s).astype(dtype)
    s = jnp.repeat(_byte_to_scale(store["scale"]), FP8_BLOCK, axis=-1)
    x = store["nope"].astype(jnp.float32) * s
    return jnp.concatenate([x.astype(dtype), store["rope"].astype(dtype)], axis=-1)


# ---------------------------------------------------------------- row updates
def scatter(store_nc, idx_j, rows_jc):
    """One sequence: store rows idx[j] := rows[j]; out-of-range indices are dropped."""
    enc = encode(rows_jc, store_nc)
    return jax.tree.map(lambda s, e: s.at[idx_j].set(e, mode="drop"), store_nc, enc)


def shift_in(win_bwc, new_btc, valid_b=None):
    """Window store [B, W, c] (oldest row first) after appending the first valid_b[b] of T new rows."""
    enc = encode(new_btc, win_bwc)
    t = new_btc.shape[1]

    def one(w, e):
        ext = jnp.concatenate([w, e], axis=1)  # [B, W+T, k]
        if valid_b is None:
            return ext[:, t:]
        return jax.vmap(lambda r, n: jax.lax.dynamic_slice_in_dim(r, n, w.shape[1], axis=0))(ext, valid_b)

    return jax.tree.map(one, win_bwc, enc)


def row_bytes(store) -> int:
    """Bytes of one row (summed over the store's leaves)."""
    return int(sum(np.dtype(leaf.dtype).itemsize * leaf.shape[-1] for leaf in jax.tree.leaves(store)))
