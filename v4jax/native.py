"""Weights kept in the release's formats on device, dequantised inside the jitted step.

DeepSeek-V4's checkpoints store (spec §10):
* "fp8": most projections as FP8 e4m3 codes [out, in] + UE8M0 scale bytes [ceil(out/128), ceil(in/128)]
  (one power of two per 128 x 128 block; `<name>.weight` + `<name>.scale`);
* "fp4": routed experts as packed e2m1 nibbles, int8 [out, in/2] (low nibble = even column) + UE8M0
  scale bytes [out, ceil(in/32)] (one power of two per 1 x 32 block);
* everything else in BF16 / F32 (norms, embeddings, head, router, compressors, the indexer's
  weights_proj, mHC, sinks).

With `ModelConfig.native_weights` the modules create their quantised weights in these formats: the
`weight` Param holds the codes as stored (float8_e4m3fn [.., out, in], or int8 [.., out, in/2]) and a
`Scale` variable beside it holds the bytes; `Linear.read` / `Experts.read` dequantise them where they are
used (inside a scanned layer's body, so only one layer's dequantised copy is alive), in fp32 and then
cast to the compute dtype. The dequantisation is exact (an e4m3 or e2m1 value times a power of two is
an fp32 number), so the logits equal those of the dequantise-at-load path bit for bit in fp32 compute.

Matmuls are `dequantise -> dot in the compute dtype` on every backend: XLA fuses the decode into the
dot's operand fusion on TPU and GPU. (The official kernels quantise the activations to FP8 too and call
an FP8 GEMM; that changes the numbers, so it is not what the reference path does.)

Sharding (`shard_shape`): both the codes and their scales are sharded as if the array had one element
per scale block, i.e. by the scale's shape (1 along a dim with a partial trailing block, so that dim is
never split): a mesh axis divides a dim of the codes only when it divides its number of blocks, hence a
shard boundary never falls inside a scale block, and a device's codes shard and its scales shard cover
the same blocks.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FP8_BLOCK = 128
FP4_BLOCK = 32
DECODE_ROWS = 64  # `dequant(after=x)`: inputs with more rows than this wait for x (prefill, scoring)


class Scale(nnx.Variable):
    """UE8M0 scale bytes of a quantised weight (not trained; lives in checkpoints as `<name>.scale`)."""


def scale_shape(fmt: str, shape: tuple) -> tuple:
    """Scale bytes' shape for a weight of logical shape [..., out, in] in format `fmt`."""
    *lead, n, k = shape
    if fmt == "fp8":
        return (*lead, -(-n // FP8_BLOCK), -(-k // FP8_BLOCK))
    return (*lead, n, -(-k // FP4_BLOCK))


def code_shape(fmt: str, shape: tuple) -> tuple:
    """Stored codes' shape: fp8 as the weight, fp4 two nibbles per byte along `in`."""
    if fmt == "fp4":
        if shape[-1] % 2:
            raise ValueError(f"an FP4 weight needs an even input dim, got {shape}")
        return (*shape[:-1], shape[-1] // 2)
    return tuple(shape)


def shard_shape(fmt: str, shape: tuple) -> tuple:
    """The shape the sharding rules see for a quantised weight of logical `shape` and its scales: the
    number of scale blocks per dim, or 1 (never split) where a partial trailing block exists."""
    blocks = scale_shape(fmt, shape)
    size = (1,) * (len(shape) - 2) + ((FP8_BLOCK, FP8_BLOCK) if fmt == "fp8" else (1, FP4_BLOCK))
    return tuple(b if d % s == 0 else 1 for d, b, s in zip(shape, blocks, size))


def quantised(fmt: str, shape: tuple, axes: tuple, role: str):
    """(codes Param, Scale) placeholders (zeros: a loader fills them) for a weight [..., out, in]."""
    meta = dict(axes=tuple(axes), fmt=fmt, shard_shape=shard_shape(fmt, shape))
    dt = jnp.float8_e4m3fn if fmt == "fp8" else jnp.int8
    codes = nnx.Param(jnp.zeros(code_shape(fmt, shape), dt), role=role, **meta)
    return codes, Scale(jnp.zeros(scale_shape(fmt, shape), jnp.uint8), **meta)


# ------------------------------------------------------------------ dequantisation (jnp, exact)
def e8m0(scale_u8: jax.Array) -> jax.Array:
    """UE8M0 bytes -> 2^(b-127) in fp32, from the exponent bits (byte 0 -> 0, as in `quant.e8m0_to_float`)."""
    return jax.lax.bitcast_convert_type(scale_u8.astype(jnp.uint32) << 23, jnp.float32)


def _expand(s: jax.Array, axis: int, block: int, size: int) -> jax.Array:
    return jnp.repeat(s, block, axis=axis, total_repeat_length=s.shape[axis] * block)[
        (slice(None),) * (axis % s.ndim) + (slice(0, size),)]


def dequant_fp8(codes: jax.Array, scale_u8: jax.Array, dtype) -> jax.Array:
    """codes [..., N, K] e4m3 x 2^(s[..., n//128, k//128] - 127) -> dtype [..., N, K]."""
    n, k = codes.shape[-2:]
    s = _expand(_expand(e8m0(scale_u8), -2, FP8_BLOCK, n), -1, FP8_BLOCK, k)
    return (codes.astype(jnp.float32) * s).astype(dtype)


def unpack_fp4(packed: jax.Array) -> jax.Array:
    """int8 [..., K/2] -> fp32 [..., K] e2m1 values (low nibble = even column, high = odd).

    A nibble s|e e|m is (-1)^s * (m/2 if e == 0 else 2^(e-1) * (1 + m/2)), computed, not looked up.
    (Tried: the fp32 bits built with integer ops plus a broadcast scale expansion: a 4-layer Flash
    prefill on v6e-8 then needed 6.2 instead of 10.4 GiB of temporaries, but the full 43-layer decode
    0.9 GB more, and no longer fitted; which of the two changes cost it was not isolated.)"""
    p = jax.lax.bitcast_convert_type(packed, jnp.uint8).astype(jnp.int32)
    nib = jnp.stack([p & 0xF, p >> 4], axis=-1)  # [..., K/2, 2]
    e, m = (nib >> 1) & 3, (nib & 1).astype(jnp.float32)
    mag = jnp.where(e == 0, 0.5 * m, jnp.exp2((e - 1).astype(jnp.float32)) * (1.0 + 0.5 * m))
    val = jnp.where(nib >= 8, -mag, mag)
    return val.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequant_fp4(packed: jax.Array, scale_u8: jax.Array, dtype) -> jax.Array:
    """packed [..., N, K/2] e2m1 x 2^(s[..., n, k//32] - 127) -> dtype [..., N, K]."""
    w = unpack_fp4(packed)
    return (w * _expand(e8m0(scale_u8), -1, FP4_BLOCK, w.shape[-1])).astype(dtype)


def dequant(fmt: str, codes: jax.Array, scale_u8: jax.Array, dtype, after=None) -> jax.Array:
    """codes x scales -> dtype. `after` (an activation, e.g. the layer's input): the decode is held back
    until it exists (`lax.optimization_barrier` on (codes, scales, after)). A dequantisation depends on
    no activation, so in an unrolled layer stack XLA may otherwise schedule every layer's at the start
    of the step and keep all the dequantised copies alive at once (Flash prefill on v6e-8: ~75 GiB).
    Inputs of at most DECODE_ROWS rows (decode steps) go without: there each decode fuses into its
    matrix-vector product, and the barrier cost Flash decode on v6e-8 0.9 GB of temporaries."""
    if after is not None and math.prod(after.shape[:-1]) > DECODE_ROWS:
        (codes, scale_u8), _ = jax.lax.optimization_barrier(((codes, scale_u8), after))
    return (dequant_fp8 if fmt == "fp8" else dequant_fp4)(codes, scale_u8, dtype)


# ------------------------------------------------------------------ which tensors are quantised
def linear_format(cfg) -> str | None:
    """Format of the FP8-eligible projections: "fp8" for a native FP8 checkpoint, else None."""
    return "fp8" if cfg.native_weights and cfg.weight_format == "fp8" else None


def expert_format(cfg) -> str | None:
    """Format of the routed experts: "fp4" (`expert_dtype` fp4), "fp8" (FP8 checkpoint), else None."""
    if not cfg.native_weights:
        return None
    if cfg.expert_dtype == "fp4":
        return "fp4"
    return "fp8" if cfg.weight_format == "fp8" else None


def stored_dtypes(fmt: str) -> tuple[set, set]:
    """Safetensors dtypes accepted for (codes, scales) of a native tensor in `fmt`."""
    return ({"F8_E4M3"} if fmt == "fp8" else {"I8", "U8"}), {"F8_E8M0", "U8"}


def host_bytes(a: np.ndarray, dtype) -> np.ndarray:
    """A stored tensor reinterpreted (not converted) as the on-device dtype of its codes or scales."""
    return np.asarray(a).view(np.dtype(dtype))
