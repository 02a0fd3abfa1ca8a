"""DeepSeek-V4 number formats (spec §10): FP8 e4m3 / FP4 e2m1 with power-of-two (UE8M0) block scales.

Two kinds of functions live here:
* checkpoint decoding in NumPy (`dequant_fp8_weight`, `dequant_fp4_weight`, `unpack_fp4`), used by the
  loader on the host, tensor by tensor;
* the official quantise-dequantise simulations in jnp (`fp8_sim`, `fp4_sim`, `hadamard`), used in the
  forward pass when `ModelConfig.qat_sim` is on (KV non-RoPE dims in FP8, indexer q/k in FP4).
Both are bit-exact against the official kernels (tests/test_quant.py).
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


def fp8_sim(x: jax.Array, block: int = 64, return_scale: bool = False):
    """FP8 e4m3 quantise-dequantise along the last dim in blocks, power-of-two scales (official act_quant)."""
    return _block_sim(x, block, FP8_MAX, FP8_AMAX_FLOOR, jnp.float8_e4m3fn, return_scale)


def fp4_sim(x: jax.Array, block: int = 32, return_scale: bool = False):
    """FP4 e2m1 quantise-dequantise along the last dim in blocks of 32, power-of-two scales."""
    return _block_sim(x, block, FP4_MAX, FP4_AMAX_FLOOR, jnp.float4_e2m1fn, return_scale)


@functools.lru_cache(maxsize=8)
def hadamard_matrix(n: int) -> np.ndarray:
    """Sylvester-order Walsh-Hadamard matrix scaled by n^-1/2 (orthonormal, symmetric)."""
    if n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h * np.float32(n ** -0.5)).astype(np.float32)


def hadamard(x: jax.Array) -> jax.Array:
    """Normalised Walsh-Hadamard transform of the last dim: x @ H_n * n^-1/2."""
    h = jnp.asarray(hadamard_matrix(x.shape[-1]))
    return jnp.einsum("...i,ij->...j", x.astype(jnp.float32), h,
                      precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def pack_fp4(values: np.ndarray) -> np.ndarray:
    """float32 e2m1-representable values [N, K] -> int8 [N, K/2] in the checkpoint packing."""
    codes = np.asarray(values, np.float32).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8).view(np.int8)
