"""DeepSeek-V4 number formats (spec §10): FP8 e4m3 / FP4 e2m1 with power-of-two (UE8M0) block scales.

Two kinds of functions live here:
* checkpoint decoding in NumPy (`dequant_fp8_weight`, `dequant_fp4_weight`, `unpack_fp4`), used by the
  loader on the host, tensor by tensor;
* the official quantise-dequantise simulations in jnp (`fp8_sim`, `fp4_sim`, `hadamard`), used in the
  forward pass when `ModelConfig.qat_sim` is on (KV non-RoPE dims in FP8, indexer q/k in FP4).
Both are bit-exact against the official kernels (tests/test_quant.py).

Quantisation-aware training (spec §10) uses the same arithmetic as straight-through fake quantisation:
the forward value is the bit-exact quantise-dequantise, the gradient is the identity (`fp8_sim` and
`fp4_sim` included, so the `qat_sim` path trains). The training-side formats:
* `fp8_act_fake`: activations, FP8 e4m3 per 1x128 block along K (the official act_quant);
* `fp8_weight_fake`: weights [..., out, in], FP8 e4m3 per 128x128 block (the FP8 checkpoint format);
* `fp4_weight_fake`: routed-expert weights, MXFP4 e2m1 per 1x32 block along the input dim (the FP4
  checkpoint format).
All scales are powers of two, 2^ceil(log2(amax / qmax)) (E8M0 bytes); trailing partial blocks get their
own scale, as in the checkpoints. Encoding the codes and scales these return with `pack_fp4` / the
exponent byte and decoding them with `dequant_fp4_weight` / `dequant_fp8_weight` gives the forward value
bit for bit.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

FP8_MAX = 448.0
FP4_MAX = 6.0
FP8_AMAX_FLOOR = 1e-4
FP4_AMAX_FLOOR = 6.0 * 2.0 ** -126
# e2m1 nibble -> value; nibbles 8..15 are the negated values (sign bit = bit 3)
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


# ------------------------------------------------------------------ checkpoint decoding (NumPy)
def e8m0_to_float(scale_bytes: np.ndarray) -> np.ndarray:
    """UE8M0 byte b -> 2^(b-127) as float32 (exact; built from the exponent bits)."""
    b = np.asarray(scale_bytes).view(np.uint8).astype(np.uint32)
    return (b << 23).view(np.float32) if b.ndim else np.float32(2.0 ** (int(b) - 127))


def dequant_fp8_weight(codes: np.ndarray, scale_bytes: np.ndarray, block: int = 128) -> np.ndarray:
    """W[i,j] = fp8(q[i,j]) * 2^(s[i//128, j//128]-127); trailing partial blocks have their own scale."""
    w = np.asarray(codes).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    s = e8m0_to_float(scale_bytes)
    n, k = w.shape
    s_full = np.repeat(np.repeat(s, block, axis=0), block, axis=1)[:n, :k]
    return w * s_full


def unpack_fp4(packed: np.ndarray) -> np.ndarray:
    """int8 [N, K/2] -> float32 [N, K] e2m1 values; low nibble = even column, high nibble = odd."""
    p = np.asarray(packed).view(np.uint8)
    out = np.empty(p.shape[:-1] + (p.shape[-1] * 2,), np.float32)
    out[..., 0::2] = E2M1_VALUES[p & 0xF]
    out[..., 1::2] = E2M1_VALUES[p >> 4]
    return out


def dequant_fp4_weight(packed: np.ndarray, scale_bytes: np.ndarray, block: int = 32) -> np.ndarray:
    """W[i,j] = e2m1(nibble) * 2^(s[i, j//32]-127)."""
    w = unpack_fp4(packed)
    s = np.repeat(e8m0_to_float(scale_bytes), block, axis=-1)[..., : w.shape[-1]]
    return w * s


# ------------------------------------------------------------------ activation simulations (jnp)
def _pow2_ceil(v: jax.Array) -> jax.Array:
    """2^ceil(log2(v)) for positive normal float32 v, exactly (from the exponent bits)."""
    bits = jax.lax.bitcast_convert_type(v, jnp.uint32)
    exp = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    exp = exp + (mant != 0).astype(jnp.uint32)  # not a power of two -> round the exponent up
    return jax.lax.bitcast_convert_type(exp << 23, jnp.float32)


def _block_scale(x_blk: jax.Array, qmax: float, floor: float) -> jax.Array:
    amax = jnp.maximum(jnp.max(jnp.abs(x_blk), axis=-1, keepdims=True), floor)
    return _pow2_ceil(amax * np.float32(1.0 / qmax))


def _block_sim(x, block, qmax, floor, qdtype, return_scale):
    dtype = x.dtype
    xb = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // block, block))
    s = _block_scale(xb, qmax, floor)
    q = jnp.clip(xb / s, -qmax, qmax).astype(qdtype)
    y = (q.astype(jnp.float32) * s).reshape(x.shape).astype(dtype)
    return (y, q.reshape(x.shape), s[..., 0]) if return_scale else y


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _block_ste(x, block, qmax, floor, qdtype):
    """`_block_sim` forward, straight-through (identity) derivative."""
    return _block_sim(x, block, qmax, floor, qdtype, False)


@_block_ste.defjvp
def _block_ste_jvp(block, qmax, floor, qdtype, primals, tangents):
    return _block_sim(primals[0], block, qmax, floor, qdtype, False), tangents[0]


def fp8_sim(x: jax.Array, block: int = 64, return_scale: bool = False):
    """FP8 e4m3 quantise-dequantise along the last dim in blocks, power-of-two scales (official act_quant).

    Straight-through gradient (identity); with `return_scale` also the codes and scales (no gradient)."""
    if return_scale:
        return _block_sim(x, block, FP8_MAX, FP8_AMAX_FLOOR, jnp.float8_e4m3fn, True)
    return _block_ste(x, block, FP8_MAX, FP8_AMAX_FLOOR, jnp.float8_e4m3fn)


def fp4_sim(x: jax.Array, block: int = 32, return_scale: bool = False):
    """FP4 e2m1 quantise-dequantise along the last dim in blocks of 32, power-of-two scales.

    Straight-through gradient (identity); with `return_scale` also the codes and scales (no gradient)."""
    if return_scale:
        return _block_sim(x, block, FP4_MAX, FP4_AMAX_FLOOR, jnp.float4_e2m1fn, True)
    return _block_ste(x, block, FP4_MAX, FP4_AMAX_FLOOR, jnp.float4_e2m1fn)


# ------------------------------------------------------------------ QAT fake quantisation (jnp, STE)
def _pad_to(x: jax.Array, axis: int, block: int) -> jax.Array:
    """Zero-pad `axis` up to a multiple of `block` (zeros never raise a block's amax)."""
    extra = -x.shape[axis] % block
    if not extra:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad)


def _rows_fake(x, block, qmax, floor, qdtype, return_scale):
    """Blocks of 1 x `block` along the last dim (a partial last block has its own scale)."""
    k = x.shape[-1]
    xp = _pad_to(x, -1, block)
    if return_scale:
        y, q, s = _block_sim(xp, block, qmax, floor, qdtype, True)
        return y[..., :k], q[..., :k], s
    return _block_ste(xp, block, qmax, floor, qdtype)[..., :k]


def fp8_act_fake(x: jax.Array, block: int = 128) -> jax.Array:
    """Activations -> FP8 e4m3 per 1 x 128 block along the last (contraction) dim, quantise-dequantise,
    straight-through gradient. Equals `fp8_sim(x, 128)` when the last dim is a multiple of 128."""
    return _rows_fake(x, block, FP8_MAX, FP8_AMAX_FLOOR, jnp.float8_e4m3fn, False)


def fp4_weight_fake(w: jax.Array, block: int = 32, return_scale: bool = False):
    """Weights [..., out, in] -> MXFP4 e2m1 per 1 x 32 block along `in`, quantise-dequantise, straight-
    through gradient. With `return_scale`: (value, e2m1 codes [..., out, in], scales [..., out, ceil(in/32)])."""
    return _rows_fake(w, block, FP4_MAX, FP4_AMAX_FLOOR, jnp.float4_e2m1fn, return_scale)


def _tile_sim(w, block, return_scale):
    """FP8 e4m3 quantise-dequantise of [..., N, K] in block x block tiles (N, K multiples of block)."""
    dtype = w.dtype
    *lead, n, k = w.shape
    wb = w.astype(jnp.float32).reshape(*lead, n // block, block, k // block, block)
    amax = jnp.maximum(jnp.max(jnp.abs(wb), axis=(-3, -1), keepdims=True), FP8_AMAX_FLOOR)
    s = _pow2_ceil(amax * np.float32(1.0 / FP8_MAX))
    q = jnp.clip(wb / s, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    y = (q.astype(jnp.float32) * s).reshape(w.shape).astype(dtype)
    return (y, q.reshape(w.shape), s[..., 0, :, 0]) if return_scale else y


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _tile_ste(w, block):
    return _tile_sim(w, block, False)


@_tile_ste.defjvp
def _tile_ste_jvp(block, primals, tangents):
    return _tile_sim(primals[0], block, False), tangents[0]


def fp8_weight_fake(w: jax.Array, block: int = 128, return_scale: bool = False):
    """Weights [..., out, in] -> FP8 e4m3 per 128 x 128 block, quantise-dequantise, straight-through
    gradient. With `return_scale`: (value, e4m3 codes, scales [..., ceil(out/128), ceil(in/128)])."""
    n, k = w.shape[-2:]
    wp = _pad_to(_pad_to(w, -2, block), -1, block)
    if return_scale:
        y, q, s = _tile_sim(wp, block, True)
        return y[..., :n, :k], q[..., :n, :k], s
    return _tile_ste(wp, block)[..., :n, :k]


def e8m0_bytes(scale) -> np.ndarray:
    """Power-of-two float32 scales -> their UE8M0 bytes (the inverse of `e8m0_to_float`)."""
    bits = np.asarray(scale, np.float32).view(np.uint32)
    return ((bits >> 23) & 0xFF).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def hadamard_matrix(n: int) -> np.ndarray:
    """[n, n] matrix of the official rotation: the Sylvester-order Walsh-Hadamard matrix H_P of the
    next power of two P >= n, scaled by n^-1/2, its first n rows and columns.

    For n = P it is orthonormal and symmetric. For other n it is what the official
    `hadamard_transform(x, scale=n ** -0.5)` (fast_hadamard_transform) computes: x zero-padded to P,
    transformed, the first n outputs kept (no longer orthogonal, but q and keys share it)."""
    if n < 1:
        raise ValueError(f"Hadamard size must be positive, got {n}")
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h[:n, :n] * np.float32(n ** -0.5)).astype(np.float32)


def hadamard(x: jax.Array) -> jax.Array:
    """Walsh-Hadamard transform of the last dim: x @ H_n * n^-1/2 (zero-padded to a power of two)."""
    h = jnp.asarray(hadamard_matrix(x.shape[-1]))
    return jnp.einsum("...i,ij->...j", x.astype(jnp.float32), h,
                      precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def pack_fp4(values: np.ndarray) -> np.ndarray:
    """float32 e2m1-representable values [N, K] -> int8 [N, K/2] in the checkpoint packing."""
    codes = np.asarray(values, np.float32).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8).view(np.int8)
