"""DeepSeekMoE (spec §8): sqrt-softplus router with a selection-only balancing bias, hash routing for
the first layers, top-k renormalisation x routed_scaling_factor, one shared expert, clamped SwiGLU.

Expert weights are stacked per layer: w1/w3 [E, F, d], w2 [E, d, F] (checkpoint layout [out, in]).
Two dispatches compute the same numbers:
  "dense"  every expert on every token, combined with zero weights for unselected experts
           (T x E x F intermediate; the exact reference, and the fastest for tiny configs);
  "gather" each token's k expert matrices gathered ([T, k, F, d]): reads only the chosen experts'
           weights, the decode path.
"auto" picks gather when T*k < E, dense otherwise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .config import ModelConfig
from .layers import HIGHEST, BalanceBias, Buffer, Linear, init_std, param


def swiglu(gate, up, limit: float):
    """silu(min(gate, limit)) * clip(up, -limit, limit) in fp32 (limit 0 = no clamp)."""
    gate, up = gate.astype(jnp.float32), up.astype(jnp.float32)
    if limit > 0:
        up = jnp.clip(up, -limit, limit)
        gate = jnp.minimum(gate, limit)
    return jax.nn.silu(gate) * up


class Gate(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs):
        e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.k, self.score_func, self.route_scale = k, cfg.scoring_func, cfg.routed_scaling_factor
        self.is_hash = cfg.is_hash_layer(layer)
        self.weight = param(rngs, (e, cfg.dim), ("experts_r", "embed"), "matrix", std=init_std(cfg, cfg.dim),
                            dtype=cfg.param_dtype)
        if self.is_hash:
            # [INFER] for training from scratch: a fixed balanced token -> k distinct experts map
            tid = (jnp.arange(cfg.vocab_size)[:, None] * 7919 + jnp.arange(k)[None, :] * (e // k + 1)) % e
            self.tid2eid = Buffer(tid.astype(jnp.int32), axes=("vocab_r", "topk"), role="table")
        else:
            self.bias = param(None, (e,), ("experts_r",), "bias", init="zeros", kind=BalanceBias)

    def scores(self, x_td: jax.Array, weight=None) -> jax.Array:
        w = self.weight[...] if weight is None else weight
        logits = jnp.einsum("td,ed->te", x_td.astype(jnp.float32), w.astype(jnp.float32), precision=HIGHEST)
        if self.score_func == "softmax":
            return jax.nn.softmax(logits, axis=-1)
        if self.score_func == "sigmoid":
            return jax.nn.sigmoid(logits)
        return jnp.sqrt(jax.nn.softplus(logits))

    def __call__(self, x_td: jax.Array, ids_t: jax.Array, stale_router=None):
        """-> (weights [T, k] fp32, expert indices [T, k] int32, scores [T, E]).

        `stale_router` = (weight, bias) from Δt steps earlier: anticipatory routing takes the expert
        *indices* from them, the gate *weights* from the current router."""
        s = self.scores(x_td)
        if self.is_hash:
            idx = self.tid2eid[...][ids_t]
        elif stale_router is not None:
            _, idx = jax.lax.top_k(self.scores(x_td, stale_router[0]) + stale_router[1], self.k)
        else:
            _, idx = jax.lax.top_k(s + self.bias[...], self.k)
        w = jnp.take_along_axis(s, idx, axis=-1)
        if self.score_func != "softmax":
            w = w / jnp.sum(w, axis=-1, keepdims=True)
        return w * self.route_scale, idx.astype(jnp.int32), s


class SharedExpert(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs):
        f, d = cfg.moe_intermediate_size, cfg.dim
        self.limit = cfg.swiglu_limit
        self.w1 = Linear(cfg, d, f, ("moe_mlp", "embed"), rngs)
        self.w2 = Linear(cfg, f, d, ("embed", "moe_mlp"), rngs)
        self.w3 = Linear(cfg, d, f, ("moe_mlp", "embed"), rngs)

    def __call__(self, x):
        return self.w2(swiglu(self.w1(x), self.w3(x), self.limit).astype(x.dtype))


class Experts(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs):
        e, f, d = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.dim
        self.limit = cfg.swiglu_limit
        kw = dict(role="expert", dtype=cfg.param_dtype)
        self.w1 = param(rngs, (e, f, d), ("experts", "moe_mlp", "embed"), std=init_std(cfg, d), **kw)
        self.w2 = param(rngs, (e, d, f), ("experts", "embed", "moe_mlp"), std=init_std(cfg, f), **kw)
        self.w3 = param(rngs, (e, f, d), ("experts", "moe_mlp", "embed"), std=init_std(cfg, d), **kw)

    def dense(self, x_td, w_tk, idx_tk):
        e = self.w1.shape[0]
        combine = jnp.zeros((x_td.shape[0], e), jnp.float32).at[jnp.arange(x_td.shape[0])[:, None], idx_tk].add(w_tk)
        dt = x_td.dtype
        g = jnp.einsum("td,efd->tef", x_td, self.w1[...].astype(dt), precision=HIGHEST)
        u = jnp.einsum("td,efd->tef", x_td, self.w3[...].astype(dt), precision=HIGHEST)
        h = (swiglu(g, u, self.limit) * combine[..., None]).astype(dt)
        return jnp.einsum("tef,edf->td", h, self.w2[...].astype(dt), precision=HIGHEST,
                          preferred_element_type=jnp.float32)

    def gather(self, x_td, w_tk, idx_tk):
        dt = x_td.dtype
        g = jnp.einsum("td,tkfd->tkf", x_td, self.w1[...][idx_tk].astype(dt), precision=HIGHEST)
        u = jnp.einsum("td,tkfd->tkf", x_td, self.w3[...][idx_tk].astype(dt), precision=HIGHEST)
        h = (swiglu(g, u, self.limit) * w_tk[..., None]).astype(dt)
        return jnp.einsum("tkf,tkdf->td", h, self.w2[...][idx_tk].astype(dt), precision=HIGHEST,
                          preferred_element_type=jnp.float32)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs):
        self.cfg = cfg
        self.gate = Gate(cfg, layer, rngs)
        self.experts = Experts(cfg, rngs)
        self.shared_experts = SharedExpert(cfg, rngs)

    def __call__(self, x_btd: jax.Array, ids_bt: jax.Array, stale_router=None):
        """-> (y [B, T, d], aux {"idx": [B,T,k], "scores": [B,T,E]})."""
        b, t, d = x_btd.shape
        x = x_btd.reshape(b * t, d)
        w, idx, s = self.gate(x, ids_bt.reshape(-1), stale_router)
        impl = self.cfg.moe_impl
        if impl == "auto":
            impl = "gather" if x.shape[0] * idx.shape[1] < self.experts.w1.shape[0] else "dense"
        y = getattr(self.experts, impl)(x, w, idx)
        y = y + self.shared_experts(x).astype(jnp.float32)
        aux = {"idx": idx.reshape(b, t, -1), "scores": s.reshape(b, t, -1)}
        return y.astype(x_btd.dtype).reshape(b, t, d), aux
