"""The DeepSeek-V4 network (spec §2, §9): embed -> 4 mHC streams -> blocks -> HC head -> norm -> head,
plus the multi-token-prediction block.

The main layers live in `stack` (see `v4jax.stack`): segment s, slot j holds the parameters of all
its rows stacked, `stack.2.1.attn.wq_a.weight` [R, ...] row r = layer `plan[2].layer(1, r)`. Below a
block, attribute paths mirror the released checkpoint names (`layers.3.attn.wq_a.weight`, ...);
`checkpoint.py` maps between the two and holds the few renames (stacked experts, `hc_attn_fn`).

Everything stateful is explicit: `Transformer.__call__(ids, start, state)` returns the new decode
state; with `state=None` it is the stateless training / full-sequence forward. Jitted callers use the
pure pattern `nnx.split` -> `jax.jit(f)(params, ...)` with `nnx.merge` inside (see `forward_fn`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import stack
from .attention import Attention
from .config import ModelConfig
from .layers import HIGHEST, BalanceBias, HyperConnection, HyperHead, Keys, Linear, RMSNorm, param
from .moe import MoE
from .sharding import gathered


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs):
        self.attn = Attention(cfg, layer, rngs)
        self.ffn = MoE(cfg, layer, rngs)
        self.attn_norm = RMSNorm(cfg.dim, cfg.rms_norm_eps, cfg.param_dtype)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.rms_norm_eps, cfg.param_dtype)
        self.hc_attn = HyperConnection(cfg, rngs)
        self.hc_ffn = HyperConnection(cfg, rngs)

    def __call__(self, x_btnd, ids_bt, start_b, state, stale_router=None, pos_bt=None, seg_bt=None, valid_b=None,
                 context_limit=None):
        y, post, comb = self.hc_attn.pre(x_btnd)
        a, state, attn_aux = self.attn(self.attn_norm(y), start_b, state, pos_bt, seg_bt, valid_b, context_limit)
        x_btnd = HyperConnection.post(a, x_btnd, post, comb)
        y, post, comb = self.hc_ffn.pre(x_btnd)
        f, aux = self.ffn(self.ffn_norm(y), ids_bt, stale_router)
        x_btnd = HyperConnection.post(f, x_btnd, post, comb)
        aux.update(attn_aux)
        return x_btnd, state, aux


class MTPBlock(Block):
    """x0 = e_proj(enorm(embed(next ids))) on every stream + h_proj(hnorm(main streams)); one Block;
    own HC head and norm; the main model's embedding and head."""

    def __init__(self, cfg: ModelConfig, layer: int, rngs):
        super().__init__(cfg, layer, rngs)
        d = cfg.dim
        self.e_proj = Linear(cfg, d, d, ("embed_out", "embed"), rngs)
        self.h_proj = Linear(cfg, d, d, ("embed_out", "embed"), rngs)
        self.enorm = RMSNorm(d, cfg.rms_norm_eps, cfg.param_dtype)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps, cfg.param_dtype)
        self.norm = RMSNorm(d, cfg.rms_norm_eps, cfg.param_dtype)
        self.hc_head = HyperHead(cfg, rngs)

    def inputs(self, h_btnd, emb_btd):
        return self.e_proj(self.enorm(emb_btd))[:, :, None, :] + self.h_proj(self.hnorm(h_btnd))


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs):
        self.cfg = cfg
        v, d = cfg.vocab_size, cfg.dim
        self.embed = Embedding(cfg, rngs)
        blocks = [Block(cfg, i, rngs) for i in range(cfg.num_hidden_layers)]  # created in layer order (init keys)
        self.plan = stack.layer_plan(cfg, cfg.scan_layers)
        self.stack = nnx.List([stack.stack_modules(blocks, seg) for seg in self.plan])
        del blocks
        self.norm = RMSNorm(d, cfg.rms_norm_eps, cfg.param_dtype)
        self.head = Linear(cfg, d, v, ("vocab", "embed"), rngs, role="head")
        self.hc_head = HyperHead(cfg, rngs)
        self.mtp = nnx.List([MTPBlock(cfg, cfg.num_hidden_layers + i, rngs) for i in range(cfg.n_mtp)])

    # ---------------------------------------------------------------- layers
    def layer_index(self) -> list[tuple[int, int, int]]:
        """(segment, slot, row) of every main layer, in layer order."""
        where = {seg.layer(j, r): (s, j, r) for s, seg in enumerate(self.plan)
                 for j in range(seg.period) for r in range(seg.reps)}
        return [where[i] for i in range(self.cfg.num_hidden_layers)]

    def block(self, layer: int) -> Block:
        """Main layer `layer` as a Block of its own (row views of the stacked parameters)."""
        s, j, r = self.layer_index()[layer]
        return stack.row_view(self.stack[s][j], r)

    # ---------------------------------------------------------------- state
    def init_state(self, batch: int, context: int, kv_layout: str | None = None) -> dict:
        """Decode state for `batch` sequences of up to `context` tokens (main layers and MTP blocks).

        `kv_layout`: None keeps KV rows in the compute dtype; "bfloat16" or "fp8" (see kvstore)."""
        dt = jnp.dtype(self.cfg.dtype)
        slots = [self.stack[s][j].attn for s, j, _ in self.layer_index()]  # static shapes: any row will do
        return {"layers": [a.empty_state(batch, context, dt, kv_layout) for a in slots],
                "mtp": [blk.attn.empty_state(batch, context, dt, kv_layout) for blk in self.mtp]}

    # ---------------------------------------------------------------- forward
    def logits(self, x_btnd, hc_head: HyperHead, norm: RMSNorm):
        h = norm(hc_head(x_btnd))
        return jnp.einsum("btd,vd->btv", h.astype(jnp.float32), self.head.weight[...].astype(jnp.float32),
                          precision=HIGHEST)

    def __call__(self, ids_bt, start_b=None, state=None, *, collect=False, stale_routers=None, positions=None,
                 segment_ids=None, inputs_embeds=None, valid_b=None, logits_at=None, context_limit=None):
        """ids [B, T] at positions start_b[b] + t -> dict(logits [B,T,V], streams [B,T,n,d], state, aux).

        Packed training passes `positions` and `segment_ids` [B, T] instead (see Attention).
        `inputs_embeds` [B, T, d] replaces the embedding lookup (hash routing still reads ids).
        `stale_routers[s][j]` = (gate weight [R, E, d], bias [R, E]) of segment s, slot j from Δt steps
        earlier, or None (anticipatory routing; see `stack`).
        `valid_b` [B]: only the first valid_b[b] tokens of row b enter the state (unequal decode chunks);
        `logits_at` [B]: compute logits only at that chunk index per row -> logits [B, 1, V].
        `context_limit` (static int): all positions are below it; attention reads only the entries
        such a context can have (decode cost follows the context, not the preallocated buffers).

        aux: a list with one dict per main layer; `aux_stacked[s][j]`: the same, stacked per segment
        slot ([R, ...], what the training losses read). With `state=None` the layers run scanned."""
        b, t = ids_bt.shape
        if start_b is None:
            start_b = jnp.zeros((b,), jnp.int32)
        x = self.embed(ids_bt) if inputs_embeds is None else inputs_embeds
        x = jnp.broadcast_to(x[:, :, None, :], (b, t, self.cfg.hc_mult, x.shape[-1]))
        args = (ids_bt, start_b, positions, segment_ids, valid_b, context_limit)
        if state is None:
            x, aux_stacked, hidden = self._scanned(x, args, stale_routers, collect)
            new_states = None
        else:
            x, aux_stacked, hidden, new_states = self._stepped(x, args, state, stale_routers)
        aux = [jax.tree.map(lambda a: a[r], aux_stacked[s][j]) for s, j, r in self.layer_index()]
        xl = x if logits_at is None else jnp.take_along_axis(x, logits_at[:, None, None, None], axis=1)
        out = {"logits": self.logits(xl, self.hc_head, self.norm), "streams": x, "aux": aux,
               "aux_stacked": aux_stacked,
               "state": {"layers": new_states, "mtp": None if state is None else state["mtp"]}}
        if collect:
            out["hidden"] = hidden
        return out

    def _scanned(self, x, args, stale_routers, collect):
        """Every segment as one scan over its rows -> (x, aux_stacked, hidden per layer or None)."""
        ids_bt, start_b, pos, seg_ids, valid_b, limit = args

        def body(blk, x, stale):
            x, _, aux = blk(x, ids_bt, start_b, None, stale, pos, seg_ids, valid_b, limit)
            return x, (aux, x if collect else None)

        aux_stacked, hs = [], {}
        for s, (seg, slots) in enumerate(zip(self.plan, self.stack)):
            stale = stale_routers[s] if stale_routers is not None else [None] * seg.period
            x, outs = stack.run_segment(slots, x, body, stale, remat=self.cfg.remat == "layer")
            aux_stacked.append([o[0] for o in outs])
            for j, (_, h) in enumerate(outs):
                for r in range(seg.reps):
                    hs[seg.layer(j, r)] = None if h is None else h[r]
        return x, aux_stacked, [hs[i] for i in range(len(hs))] if collect else None

    def _stepped(self, x, args, state, stale_routers):
        """The layers one by one on row views (each updates its own decode state in place)."""
        ids_bt, start_b, pos, seg_ids, valid_b, limit = args
        new_states, hidden = [], []
        aux_rows = [[[None] * seg.reps for _ in range(seg.period)] for seg in self.plan]
        for i, (s, j, r) in enumerate(self.layer_index()):
            st = None if stale_routers is None or stale_routers[s][j] is None else \
                jax.tree.map(lambda a: a[r], stale_routers[s][j])
            x, new, aux = self.block(i)(x, ids_bt, start_b, state["layers"][i], st, pos, seg_ids, valid_b, limit)
            new_states.append(new)
            hidden.append(x)
            aux_rows[s][j][r] = aux
        aux_stacked = [[jax.tree.map(lambda *a: jnp.stack(a), *rows) for rows in slot_rows] for slot_rows in aux_rows]
        return x, aux_stacked, hidden, new_states

    def mtp_logits(self, h_btnd, next_ids_bt, start_b=None, state=None, k: int = 0, positions=None,
                   segment_ids=None, stale_router=None, valid_b=None, context_limit=None):
        """MTP block k on main streams h (positions t) with tokens t+1 -> (logits predicting t+2, state, aux)."""
        graphdef, st = nnx.split(self.mtp[k])
        blk = nnx.merge(graphdef, gathered(st, stacked=False))
        b = h_btnd.shape[0]
        if start_b is None:
            start_b = jnp.zeros((b,), jnp.int32)
        x = blk.inputs(h_btnd, self.embed(next_ids_bt))
        x, st, aux = blk(x, next_ids_bt, start_b, state, stale_router, positions, segment_ids, valid_b, context_limit)
        return self.logits(x, blk.hc_head, blk.norm), st, aux


class Embedding(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs):
        self.dtype = jnp.dtype(cfg.dtype)
        self.weight = param(rngs, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), "embed",
                            std=cfg.initializer_range, dtype=cfg.param_dtype)

    def __call__(self, ids):
        return self.weight[...][ids].astype(self.dtype)


# -------------------------------------------------------------------- construction & counting
def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    return Transformer(cfg, Keys(seed))


def abstract(cfg: ModelConfig) -> Transformer:
    """The model with ShapeDtypeStruct leaves (no allocation)."""
    return nnx.eval_shape(lambda: build(cfg))


def count_params(cfg: ModelConfig) -> dict:
    """Parameter counts from shapes (jax.eval_shape, no allocation).

    total / active include both embedding matrices, the balancing biases and the MTP block(s);
    `active` counts num_experts_per_tok routed experts per MoE layer; `*_main` leave MTP out.
    """
    model = abstract(cfg)
    state = nnx.state(model, nnx.Param)
    total = mtp = expert = 0
    for path, var in nnx.to_flat_state(state):
        n = int(np.prod(var.shape))
        total += n
        if path[0] == "mtp":
            mtp += n
        if var.get_metadata().get("role") == "expert":
            expert += n
    n_bias = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, BalanceBias)))
    total += n_bias
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    active = total - expert + expert * k // e
    mtp_expert = expert * cfg.n_mtp // (cfg.num_hidden_layers + cfg.n_mtp)
    mtp_active = mtp - mtp_expert + mtp_expert * k // e
    return {"total": total, "active": active, "mtp": mtp,
            "total_main": total - mtp, "active_main": active - mtp_active}


# -------------------------------------------------------------------- jitted pure functions
@functools.lru_cache(maxsize=16)
def forward_fn(graphdef, collect: bool = False):
    """jit((params, ids, start, state) -> outputs dict), cached per graphdef."""
    def f(params, ids, start, state):
        return nnx.merge(graphdef, params)(ids, start, state, collect=collect)

    return jax.jit(f)


@functools.lru_cache(maxsize=16)
def mtp_fn(graphdef):
    """jit((params, main streams, next ids, start, state) -> (MTP logits, state, aux))."""
    def f(params, h, next_ids, start, state):
        return nnx.merge(graphdef, params).mtp_logits(h, next_ids, start, state)

    return jax.jit(f)
