"""Building blocks: parameters with logical axes and optimiser roles, RMSNorm, RoPE (+YaRN), mHC.

Every parameter is created through `param(...)`, which records
* `axes`: one logical axis name per dim, resolved to mesh axes by `sharding.RULES`;
* `role`: how the optimiser treats it ("matrix" -> Muon, "expert" -> Muon per expert slice,
  "vector" -> AdamW: embeddings, head, norms, mHC base/scale, sinks, position biases).
Decided here, where the parameter is created, never by matching names later.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import mhc, native, quant
from .config import ModelConfig, yarn_correction_range

HIGHEST = jax.lax.Precision.HIGHEST


class Buffer(nnx.Variable):
    """Non-trained model state that lives in checkpoints (hash-routing table)."""


class BalanceBias(nnx.Variable):
    """Aux-loss-free balancing bias: moved by the load rule outside the optimiser, used for selection only."""


class Keys:
    """Deterministic per-parameter PRNG keys: fold_in(seed key, creation index).

    (Used instead of nnx.Rngs, whose stateful counter costs ~30 ms per draw under eval_shape.)"""

    def __init__(self, seed: int = 0):
        self.base, self.count = jax.random.key(seed), 0

    def __call__(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.base, self.count)


def param(rngs: Keys | None, shape, axes, role: str, init: str = "normal", std: float = 0.02,
          dtype="float32", value=None, kind=nnx.Param):
    """One parameter; `init` in {"normal", "zeros", "ones", "const"}; axes has one logical name per dim."""
    assert len(axes) == len(shape), (shape, axes)
    dt = jnp.dtype(dtype)
    if value is not None:
        arr = jnp.full(shape, value, dt)
    elif init == "normal":
        arr = (std * jax.random.normal(rngs(), shape, jnp.float32)).astype(dt)
    elif init == "zeros":
        arr = jnp.zeros(shape, dt)
    elif init == "ones":
        arr = jnp.ones(shape, dt)
    else:
        raise ValueError(init)
    return kind(arr, axes=tuple(axes), role=role)


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """x[..., k] @ w[n, k]^T in the activation dtype (weights stored [out, in] like the checkpoint)."""
    return jnp.einsum("...k,nk->...n", x, w.astype(x.dtype), precision=HIGHEST)


class Linear(nnx.Module):
    """A bias-free projection; `weight` is [out, in] like the checkpoint.

    With `cfg.qat_fp8_linear` the forward is FP8 training's: activations quantised per 1x128 block
    along K and the weight per 128x128 block (power-of-two scales), dequantised, multiplied; gradients
    pass straight through to the master weight and the input. `fp8` (default: every "matrix" Linear
    except the bf16 ones of spec §10) says whether this projection takes part."""

    # Projections that stay bf16/fp32 in DeepSeek-V4 (spec §10), by the logical axis of their output:
    # the compressors' wkv/wgate ("comp_out"), the indexer's weights_proj ("idx_heads"). (wo_a and the
    # head never go through `__call__`: their callers read the weight.)
    NOT_FP8_AXES = frozenset({"comp_out", "idx_heads"})

    def __init__(self, cfg: ModelConfig, fan_in: int, fan_out: int, axes, rngs, role: str = "matrix",
                 fp8: bool | None = None):
        if fp8 is None:
            fp8 = role == "matrix" and not self.NOT_FP8_AXES & set(axes)
        self.qat_fp8 = bool(cfg.qat_fp8_linear and fp8)
        self.fmt = native.linear_format(cfg) if fp8 else None  # "fp8": codes + scales as stored
        if self.fmt:
            self.weight, self.scale = native.quantised(self.fmt, (fan_out, fan_in), axes, role)
        else:
            self.weight = param(rngs, (fan_out, fan_in), axes, role, std=init_std(cfg, fan_in),
                                dtype=cfg.param_dtype)

    def read(self, dtype=jnp.float32, after=None) -> jax.Array:
        """The weight [out, in] in `dtype` (native FP8 codes dequantised here, inside the step, once
        `after` (the input) exists: `native.dequant`)."""
        if self.fmt:
            return native.dequant(self.fmt, self.weight[...], self.scale[...], dtype, after)
        return self.weight[...].astype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.qat_fp8:
            return dense(quant.fp8_act_fake(x), quant.fp8_weight_fake(self.weight[...]))
        return dense(x, self.read(x.dtype, after=x) if self.fmt else self.weight[...])


# ------------------------------------------------------------------ RMSNorm
class RMSNorm(nnx.Module):
    """w * x / sqrt(mean(x^2) + eps), computed in fp32, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float, param_dtype="float32"):
        self.eps = eps
        self.weight = param(None, (dim,), ("norm",), "vector", init="ones", dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


def rms_norm(x: jax.Array, w: jax.Array | None, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if w is not None:
        y = w.astype(jnp.float32) * y
    return y.astype(x.dtype)


# ------------------------------------------------------------------ RoPE
def rope_inv_freq(cfg: ModelConfig, compressed_layer: bool) -> np.ndarray:
    """Inverse frequencies [rd/2] (float32), as the official precompute_freqs_cis computes them.

    SWA-only layers (ratio 0, the MTP block included): plain RoPE with `rope_theta`.
    CSA/HCA layers: `compress_rope_theta` with YaRN (no mscale).
    """
    dim = cfg.qk_rope_head_dim
    theta = cfg.compress_rope_theta if compressed_layer else cfg.rope_theta
    # theta**e rounded once from float64: numpy's float32 power differs by an ulp between CPUs (SIMD paths);
    # the correctly rounded value is what the official (torch) tables hold.
    expo = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    power = (np.float64(np.float32(theta)) ** expo.astype(np.float64)).astype(np.float32)
    freqs = np.float32(1.0) / power
    freqs = freqs.astype(np.float32)
    if compressed_layer and cfg.rope_original_max_position > 0:
        low, high = yarn_correction_range(cfg, theta)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / np.float32(high - low), 0, 1)
        smooth = (np.float32(1) - ramp).astype(np.float32)
        freqs = (freqs / np.float32(cfg.rope_factor) * (np.float32(1) - smooth) + freqs * smooth)
    return freqs.astype(np.float32)


def rope_cos_sin(pos: jax.Array, inv_freq: np.ndarray):
    """cos/sin [..., rd/2] of fp32(pos * inv_freq) for integer positions `pos` [...]."""
    ang = pos.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, inverse: bool = False) -> jax.Array:
    """Interleaved-pair rotation of the trailing 2*len(cos) dims of x.

    x: [..., n]; cos/sin broadcast against [..., rd/2]. Pairs (x_2i, x_2i+1) rotate by +angle
    (or -angle when `inverse`, the output de-rotation). Math in fp32, result in x.dtype.
    """
    rd = 2 * cos.shape[-1]
    nope, rot = x[..., :-rd], x[..., -rd:].astype(jnp.float32)
    x0, x1 = rot[..., 0::2], rot[..., 1::2]
    if inverse:
        sin = -sin
    y0 = x0 * cos - x1 * sin
    y1 = x0 * sin + x1 * cos
    rot = jnp.stack([y0, y1], axis=-1).reshape(rot.shape).astype(x.dtype)
    return jnp.concatenate([nope, rot], axis=-1)


# ------------------------------------------------------------------ mHC (math in mhc.py)
class HyperConnection(nnx.Module):
    """mHC around one sub-layer: pre (collapse n streams) and post (expand + Sinkhorn mix)."""

    def __init__(self, cfg: ModelConfig, rngs):
        n, d = cfg.hc_mult, cfg.dim
        self.n, self.iters, self.hc_eps, self.norm_eps = n, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
        mix = (2 + n) * n
        # Init [INFER]: fn small normal; scale (the paper's gating alpha) 0.01; base so pre ~ 1/n-ish,
        # post ~ 1 and comb ~ identity (large diagonal logits).
        self.fn = param(rngs, (mix, n * d), ("hc_mix", "hc_dim"), "matrix", std=cfg.initializer_range)
        base = np.zeros((mix,), np.float32)
        base[2 * n:] = (8.0 * np.eye(n, dtype=np.float32)).reshape(-1)
        self.base = nnx.Param(jnp.asarray(base), axes=("hc_mix",), role="vector")
        self.scale = param(None, (3,), ("hc_gate",), "vector", value=0.01)

    def pre(self, x_btnd: jax.Array):
        """-> (sub-layer input y [B,T,d], post [B,T,n], comb [B,T,n,n])."""
        return mhc.hc_pre(x_btnd, self.fn[...], self.scale[...], self.base[...], iters=self.iters,
                          hc_eps=self.hc_eps, norm_eps=self.norm_eps)

    @staticmethod
    def post(f_btd: jax.Array, x_btnd: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
        """X'_k = post_k * F + sum_j comb[j, k] X_j."""
        return mhc.hc_post(f_btd, x_btnd, post, comb)


class HyperHead(nnx.Module):
    """Final collapse of the n streams: weights sigmoid(scale*mix + base) + eps, no Sinkhorn."""

    def __init__(self, cfg: ModelConfig, rngs):
        n, d = cfg.hc_mult, cfg.dim
        self.hc_eps, self.norm_eps = cfg.hc_eps, cfg.rms_norm_eps
        self.fn = param(rngs, (n, n * d), ("hc_head", "hc_dim"), "matrix", std=cfg.initializer_range)
        self.base = param(None, (n,), ("hc_head",), "vector", init="zeros")
        self.scale = param(None, (1,), ("hc_gate",), "vector", value=0.01)

    def __call__(self, x_btnd: jax.Array) -> jax.Array:
        return mhc.hc_head(x_btnd, self.fn[...], self.scale[...], self.base[...], hc_eps=self.hc_eps,
                           norm_eps=self.norm_eps)


def init_std(cfg: ModelConfig, fan_in: int) -> float:
    """Matrix init std: initializer_range, shrunk for very wide inputs [INFER: not published]."""
    return min(cfg.initializer_range, 1.0 / math.sqrt(fan_in))
