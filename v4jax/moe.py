"""DeepSeekMoE (spec §8): sqrt-softplus router with a selection-only balancing bias, hash routing for
the first layers, top-k renormalisation x routed_scaling_factor, one shared expert, clamped SwiGLU.

Expert weights are stacked per layer: w1/w3 [E, F, d], w2 [E, d, F] (checkpoint layout [out, in]).
Four dispatches compute the same numbers ("ep" with its default, exact capacity):
  "dense"  every expert on every token, combined with zero weights for unselected experts
           (T x E x F intermediate; the exact reference);
  "gather" each token's k expert matrices gathered ([T, k, F, d]): reads only the chosen experts'
           weights, the decode path.
  "grouped" the T*k assignments sorted by expert into row tiles of one expert each, one grouped matmul
           per weight (`grouped_matmul`; kernel `moe_kernel`: "jnp" scan over tiles for XLA:CPU,
           "ragged_dot" for GPU, "megablox" Pallas for TPU): ~T*k rows of work, the prefill/training path.
  "ep"     expert parallelism: under a mesh with an `expert` axis > 1 (set with `jax.set_mesh`), every
           device sends its tokens to the devices owning their experts and gets the results back, inside
           `jax.shard_map` with capacity-padded `all_to_all`s (see `ep_dispatch`); without such a mesh it
           falls back to the "auto" choice between gather and grouped.
"auto" picks ep when the mesh allows it and T*k >= E, else gather when T*k < E, grouped otherwise
(grouped beats dense on XLA:CPU from T*k = E on: 2-6x forward, 4-6x with gradients, tiny config).
`moe_capacity_factor` bounds the ep slots per (source device, expert): 0 (the default) = every local
token, so nothing is dropped (buffers of E x t_local rows per device: dense-like work, which is what
the CPU tests check); f > 0 = ceil(f * t_local * k / E) slots (GShard-style; the overflow is dropped),
the setting for real expert-parallel runs. `ragged_all_to_all` is not used: XLA:CPU lacks it.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from . import grouped_matmul, native, quant
from .config import ModelConfig
from .layers import HIGHEST, BalanceBias, Buffer, Linear, init_std, param
from .sharding import RULES, spec_for


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
        self.capacity_factor = float(getattr(cfg, "moe_capacity_factor", 0.0))  # "ep" only; 0 = exact
        self.qat_fp4 = bool(cfg.qat_fp4_experts)
        self.kernel = getattr(cfg, "moe_kernel", "jnp")  # "grouped" only: the grouped-matmul kernel
        self.fmt = native.expert_format(cfg)  # "fp4" / "fp8": codes + `w*_scale` as stored
        self.logical = (("w1", (e, f, d)), ("w2", (e, d, f)), ("w3", (e, f, d)))  # static: a tuple
        for name, shape in self.logical:
            axes = ("experts", "embed", "moe_mlp") if name == "w2" else ("experts", "moe_mlp", "embed")
            if self.fmt:
                codes, scale = native.quantised(self.fmt, shape, axes, "expert")
                setattr(self, name, codes)
                setattr(self, name + "_scale", scale)
            else:
                setattr(self, name, param(rngs, shape, axes, "expert", std=init_std(cfg, shape[-1]),
                                          dtype=cfg.param_dtype))

    def read(self, name: str, expert=None, dtype=jnp.float32, after=None) -> jax.Array:
        """Expert weight `name` ("w1", "w2", "w3") as the forward uses it: all experts [E, o, i], or the
        one matrix [o, i] of `expert` (a traced scalar index: a dynamic slice, reading only that expert).

        With `qat_fp4_experts` (FP4 QAT, spec §10): MXFP4 quantise-dequantise per 1x32 block along the
        input dim, then FP8 per 128x128 block (lossless when the 32-block scales of a tile fit e4m3, as
        the paper found); straight-through gradient to the master weight. `after`: native codes are
        decoded only once it (the tokens) exists (`native.dequant`)."""
        w = self.select(getattr(self, name)[...], expert)
        if self.fmt:  # native codes: dequantised here (one layer, or one chosen expert, at a time)
            scale = self.select(getattr(self, name + "_scale")[...], expert)
            return native.dequant(self.fmt, w, scale, dtype, after)
        return quant.fp8_weight_fake(quant.fp4_weight_fake(w)) if self.qat_fp4 else w

    @staticmethod
    def select(a, expert):
        return a if expert is None else jax.lax.dynamic_index_in_dim(a, expert, keepdims=False)

    def stored(self) -> dict:
        """name -> the arrays `read` decodes: (codes, scales) for native weights, (weight,) otherwise."""
        return {n: (getattr(self, n)[...],) + ((getattr(self, n + "_scale")[...],) if self.fmt else ())
                for n, _ in self.logical}

    def dense(self, x_td, w_tk, idx_tk):
        e = self.w1.shape[0]
        combine = jnp.zeros((x_td.shape[0], e), jnp.float32).at[jnp.arange(x_td.shape[0])[:, None], idx_tk].add(w_tk)
        dt = x_td.dtype
        g = jnp.einsum("td,efd->tef", x_td, self.read("w1", dtype=dt, after=x_td), precision=HIGHEST)
        u = jnp.einsum("td,efd->tef", x_td, self.read("w3", dtype=dt, after=x_td), precision=HIGHEST)
        h = (swiglu(g, u, self.limit) * combine[..., None]).astype(dt)
        return jnp.einsum("tef,edf->td", h, self.read("w2", dtype=dt, after=x_td), precision=HIGHEST,
                          preferred_element_type=jnp.float32)

    def gather(self, x_td, w_tk, idx_tk):
        """Few assignments (decode, T*k < E): a loop over the T*k (token, expert) pairs, each slicing its
        expert's three matrices (reading only the chosen experts' weights; a dynamic slice is a contiguous
        copy, ~3x faster on XLA:CPU than gathering [T, k, F, d] at once) -> y_td fp32. Under a mesh whose
        expert axis shards the experts, every device slices only its own (`gather_per_shard`): a slice
        at a traced expert index of the sharded array would make XLA gather every expert first."""
        e, f = self.w1.shape[:2]
        layout = ep_layout(x_td.shape[0], e, f, tokens_split=False)
        if layout is not None:
            return gather_per_shard(x_td, w_tk, idx_tk, self.stored(), layout, self.limit, self.fmt)
        return gather_pairs(x_td, w_tk, idx_tk, self.read, self.limit)

    def grouped(self, x_td, w_tk, idx_tk):
        """Sorted dispatch (`grouped_matmul.dispatch`): rows grouped by expert in tiles of one expert each,
        a grouped matmul (`moe_kernel`: "jnp" | "ragged_dot" | "megablox") per weight; exact, static shapes."""
        act = functools.partial(swiglu, limit=self.limit)
        read = functools.partial(self.read, dtype=x_td.dtype, after=x_td)
        mesh = jax.sharding.get_abstract_mesh()
        if self.kernel == "jnp" or mesh.empty:
            return grouped_matmul.dispatch(x_td, w_tk, idx_tk, read, self.w1.shape[0], act, self.kernel,
                                           precision=HIGHEST)
        return grouped_per_shard(x_td, w_tk, idx_tk, {n: read(n) for n in ("w1", "w2", "w3")}, mesh, act,
                                 self.kernel)

    def ep(self, x_td, w_tk, idx_tk):
        """Expert-parallel dispatch (`ep_dispatch`); without a mesh that allows it, gather or grouped."""
        e, f = self.w1.shape[:2]
        layout = ep_layout(x_td.shape[0], e, f)
        if layout is None:
            return getattr(self, self.choose("auto", x_td.shape[0], idx_tk.shape[1]))(x_td, w_tk, idx_tk)
        # in the compute dtype before the dispatch gathers them over fsdp (half the bytes moved for bf16)
        w1, w2, w3 = (self.read(n, dtype=x_td.dtype, after=x_td).astype(x_td.dtype) for n in ("w1", "w2", "w3"))
        return ep_dispatch(x_td, w_tk, idx_tk, w1, w2, w3, layout, self.limit, self.capacity_factor)

    def choose(self, impl: str, n_tokens: int, k: int) -> str:
        """"auto" -> "ep" when the context mesh allows it and T*k >= E, else "gather" when T*k < E, else "grouped"."""
        if impl != "auto":
            return impl
        e, f = self.w1.shape[:2]
        if n_tokens * k >= e and ep_layout(n_tokens, e, f) is not None:
            return "ep"
        return "gather" if n_tokens * k < e else "grouped"


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
        impl = self.experts.choose(self.cfg.moe_impl, x.shape[0], idx.shape[1])
        y = getattr(self.experts, impl)(x, w, idx)
        y = y + self.shared_experts(x).astype(jnp.float32)
        aux = {"idx": idx.reshape(b, t, -1), "scores": s.reshape(b, t, -1)}
        return y.astype(x_btd.dtype).reshape(b, t, d), aux


def gather_pairs(x_td, w_tk, idx_tk, read, limit: float, mask_tk=None):
    """sum_k r[t, k] * FFN_{idx[t, k]}(x[t]) [T, d] fp32, one (token, expert) pair at a time; `read(name, e)`
    gives expert e's matrix [o, i]; `mask_tk` (optional) zeroes pairs (experts held elsewhere)."""
    t, k = idx_tk.shape
    dt = x_td.dtype
    r_tk = w_tk if mask_tk is None else jnp.where(mask_tk, w_tk, 0.0)

    def one(a):
        e, x_d, r = a
        g = jnp.einsum("d,fd->f", x_d, read("w1", e).astype(dt), precision=HIGHEST)
        u = jnp.einsum("d,fd->f", x_d, read("w3", e).astype(dt), precision=HIGHEST)
        h = (swiglu(g, u, limit) * r).astype(dt)
        return jnp.einsum("f,df->d", h, read("w2", e).astype(dt), precision=HIGHEST,
                          preferred_element_type=jnp.float32)

    a = t * k  # up to 8 pairs unrolled: no loop (a while loop costs ~40 us per decode step on XLA:CPU)
    _, y_ad = jax.lax.scan(lambda c, xs: (c, one(xs)), None,
                           (idx_tk.reshape(-1), jnp.repeat(x_td, k, axis=0), r_tk.reshape(-1)), unroll=a <= 8)
    return y_ad.reshape(t, k, -1).sum(axis=1)


def gather_per_shard(x_td, r_tk, idx_tk, stored: dict, layout, limit: float, fmt: str | None = None):
    """`gather_pairs` with the experts sharded over the layout's expert axis (decode): every device has
    all T tokens, runs the pairs whose expert it holds on its local slices (the others masked to
    zero), and a psum over the expert axis (and the FFN-width axis, when it splits F) adds them up.
    `stored[name]` = the arrays `Experts.read` decodes ((codes, scales) when `fmt` is set: each pair
    dequantises only its own expert's matrix)."""
    mesh, _, ax, tp = layout
    ffn = stored["w1"][0].shape[1]
    if fmt and tp is not None and (ffn // mesh.shape[tp]) % (native.FP4_BLOCK if fmt == "fp4" else native.FP8_BLOCK):
        tp = None  # an F shard must hold whole scale blocks (w2's blocks run along F)

    def body(x, r, idx, *arrays):
        n_local = arrays[0].shape[0]
        local = idx - jax.lax.axis_index(ax) * n_local
        mine = (local >= 0) & (local < n_local)
        ws = dict(zip(names, [arrays[i:i + per] for i in range(0, len(arrays), per)]))

        def read(name, e):
            a = [jax.lax.dynamic_index_in_dim(v, e, keepdims=False) for v in ws[name]]
            return native.dequant(fmt, *a, x.dtype) if fmt else a[0]

        y = gather_pairs(x, r, jnp.clip(local, 0, n_local - 1), read, limit, mine)
        return jax.lax.psum(y, (ax,) if tp is None else (ax, tp))

    names, per = ("w1", "w2", "w3"), len(stored["w1"])
    w13, w2 = P(ax, tp, None), P(ax, None, tp)
    specs = [w13 if n != "w2" else w2 for n in names for _ in range(per)]
    arrays = [a for n in names for a in stored[n]]
    return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(), *specs), out_specs=P(),
                         check_vma=False)(x_td, r_tk, idx_tk, *arrays)


def grouped_per_shard(x_td, r_tk, idx_tk, weights: dict, mesh, act, kernel: str):
    """The "grouped" dispatch with a Pallas kernel (megablox; XLA cannot partition a Mosaic call) on a
    mesh: under `jax.shard_map` every device sorts and multiplies its own tokens (split over the batch
    axes of the rules table) against every expert, the expert FFN width F split over the "moe_mlp"
    axis when each share is a multiple of 128 (megablox's tiles; partial w2 products summed by a psum
    over it). Expert weights enter gathered over the other axes (FSDP-style; expert parallelism is the
    "ep" dispatch)."""
    e, f = weights["w1"].shape[:2]
    tok = spec_for(("batch",), (x_td.shape[0],), mesh)[0]
    tp = spec_for(("moe_mlp",), (f,), mesh)[0]
    if tp is not None and (f // mesh.shape[tp]) % 128:
        tp = None

    def body(x, r, idx, w1, w2, w3):
        ws = {"w1": w1, "w2": w2, "w3": w3}
        y = grouped_matmul.dispatch(x, r, idx, ws.__getitem__, e, act, kernel, precision=HIGHEST)
        return y if tp is None else jax.lax.psum(y, tp)

    w13, w2 = P(None, tp, None), P(None, None, tp)
    return jax.shard_map(body, mesh=mesh, in_specs=(P(tok), P(tok), P(tok), w13, w2, w13), out_specs=P(tok),
                         check_vma=False)(x_td, r_tk, idx_tk, weights["w1"], weights["w2"], weights["w3"])


# ---------------------------------------------------------------------------- expert parallelism
def ep_layout(n_tokens: int, n_experts: int, ffn: int, tokens_split: bool = True):
    """-> (mesh, token axes, expert axis, tensor axis or None) for the "ep" dispatch, or None.

    The mesh is the context one (`jax.set_mesh(mesh)`; abstract inside jit). "ep" needs an expert axis
    (RULES["experts"]) > 1 dividing the experts, and the tokens divisible by the batch axes times the
    expert axis (tokens are sharded over the batch axes, then split across the expert axis; not needed
    with `tokens_split=False`, the decode gather, where every device sees every token). The
    expert FFN width stays sharded over the tensor axis when that divides it (as `spec_for` does)."""
    mesh = jax.sharding.get_abstract_mesh()
    ax = RULES["experts"]
    if mesh.empty or mesh.shape.get(ax, 1) <= 1 or n_experts % mesh.shape[ax]:
        return None
    batch = RULES["batch"]
    batch = (batch,) if isinstance(batch, str) else tuple(batch or ())
    tok = tuple(a for a in batch if a in mesh.shape and a != ax) + (ax,)
    if tokens_split and n_tokens % math.prod(mesh.shape[a] for a in tok):
        return None
    tp = RULES["moe_mlp"]
    tp = tp if isinstance(tp, str) and mesh.shape.get(tp, 1) > 1 and ffn % mesh.shape[tp] == 0 else None
    return mesh, tok, ax, tp


def ep_capacity(t_local: int, k: int, n_experts: int, factor: float) -> int:
    """Slots per (source device, expert). factor <= 0: t_local, so no assignment is ever dropped (a
    token picks distinct experts); else ceil(factor * t_local * k / E), assignments past it dropped."""
    if factor <= 0:
        return t_local
    return max(1, min(t_local, math.ceil(factor * t_local * k / n_experts)))


def _rank_in_expert(e_a: jax.Array, n_experts: int) -> jax.Array:
    """[A] expert ids -> [A] rank of each assignment among those to the same expert (in order)."""
    order = jnp.argsort(e_a, stable=True)
    counts = jnp.bincount(e_a, length=n_experts)
    start = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(e_a.shape[0], dtype=jnp.int32) - start[e_a[order]].astype(jnp.int32)
    return jnp.zeros_like(rank_sorted).at[order].set(rank_sorted)


def ep_local(x_td, r_tk, idx_tk, w1_efd, w2_edf, w3_efd, *, axis: str, tp, cap: int, limit: float):
    """One device's share of the "ep" dispatch (the body of `shard_map`).

    t local tokens, k experts each (A = t*k assignments), n devices on `axis`, l = E/n local experts,
    c = `cap` slots per (source device, expert), s = source device:
      slot_a = e_a * c + rank of a among this device's assignments to e_a (>= c: dropped)
      x_td -> send [E*c, d] (scatter) --all_to_all--> x_slcd [n, l, c, d] (rows from every source)
      r_tk -> the same way -> r_slc [n, l, c]    (routing weight, applied before w2 as in "dense")
      SwiGLU of the l local experts (F maybe sharded over `tp`) -> y_slcd [n, l, c, d] fp32
      --all_to_all back--> [E*c, d] -> gather slot_a -> y_tkd -> sum over k -> y_td (psum over `tp`)."""
    t, d = x_td.shape
    k, l = idx_tk.shape[1], w1_efd.shape[0]
    n = jax.lax.axis_size(axis)
    e_a = idx_tk.reshape(-1)
    slot_a = jnp.where((rank := _rank_in_expert(e_a, n * l)) < cap, e_a * cap + rank, n * l * cap)
    a2a = functools.partial(jax.lax.all_to_all, axis_name=axis, split_axis=0, concat_axis=0, tiled=True)
    send_sd = jnp.zeros((n * l * cap, d), x_td.dtype).at[slot_a].add(jnp.repeat(x_td, k, axis=0), mode="drop")
    send_s = jnp.zeros((n * l * cap,), jnp.float32).at[slot_a].add(r_tk.reshape(-1), mode="drop")
    x_slcd = a2a(send_sd).reshape(n, l, cap, d)
    r_slc = a2a(send_s).reshape(n, l, cap)
    dt = x_td.dtype
    g = jnp.einsum("slcd,lfd->slcf", x_slcd, w1_efd.astype(dt), precision=HIGHEST)
    u = jnp.einsum("slcd,lfd->slcf", x_slcd, w3_efd.astype(dt), precision=HIGHEST)
    h = (swiglu(g, u, limit) * r_slc[..., None]).astype(dt)
    y_slcd = jnp.einsum("slcf,ldf->slcd", h, w2_edf.astype(dt), precision=HIGHEST,
                        preferred_element_type=jnp.float32)
    y_sd = a2a(y_slcd.reshape(n * l * cap, d))
    y_td = y_sd.at[slot_a].get(mode="fill", fill_value=0.0).reshape(t, k, d).sum(axis=1)
    return y_td if tp is None else jax.lax.psum(y_td, tp)


def ep_dispatch(x_td, r_tk, idx_tk, w1_efd, w2_edf, w3_efd, layout, limit: float, capacity_factor: float = 0.0):
    """Routed-expert output [T, d] fp32 with experts sharded over the layout's expert axis: tokens
    [T, d] / weights [T, k] / indices [T, k] enter `shard_map` split over (batch axes..., expert axis),
    the weights as [E/n, F(/tp), d] blocks (gathered over fsdp on the way in); see `ep_local`."""
    mesh, tok, ax, tp = layout
    t_local = x_td.shape[0] // math.prod(mesh.shape[a] for a in tok)
    cap = ep_capacity(t_local, idx_tk.shape[1], w1_efd.shape[0], capacity_factor)
    body = functools.partial(ep_local, axis=ax, tp=tp, cap=cap, limit=limit)
    w13, w2 = P(ax, tp, None), P(ax, None, tp)
    return jax.shard_map(body, mesh=mesh, in_specs=(P(tok), P(tok), P(tok), w13, w2, w13),
                         out_specs=P(tok))(x_td, r_tk, idx_tk, w1_efd, w2_edf, w3_efd)
