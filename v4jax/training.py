"""The DeepSeek-V4 train step: one jitted pure function (state, batch) -> (state, metrics).

Losses (spec §8, §9, §12): next-token cross-entropy inside each document (nothing is predicted after
an EOS: that is alignment padding), the MTP loss on token t+2 (weight 0.3, 0.1 once the learning rate
decays), the sequence-wise balance loss alpha * sum_e f_e P_e per row and score-routed MoE layer.
After the optimiser update, and outside it, every score-routed layer's selection bias moves by
gamma * sign(mean load - load_e) (aux-loss-free balancing; hash layers have no bias).

Anticipatory routing: the state keeps a ring of the last `ar_delta` router parameters (gate weight and
bias) of every score-routed layer; with `ar_active` the step takes expert *indices* from the entry
written ar_delta steps ago and the gate *weights* from the current router.

Gradient accumulation (`grad_accum` = A > 1): one step is one optimiser update. The batch's rows split
into A micro-batches (row r goes to micro-batch r mod A, so each device keeps its own rows) and a
`lax.scan` sums their gradients, each micro-batch's loss being its share of the whole batch's loss (the
cross-entropies divided by the whole batch's target count, the per-row means by A): the update, the
metrics and the balancing-bias move (once, from the expert counts of all A micro-batches) are those of
one step on the whole batch, with the activation memory of one micro-batch.

Train state (a pytree, donated): {"params": nnx.State of Params, "rest": balancing biases and hash
tables, "opt": optax state, "step": int32, "router_ring": [(W [Δ, E, d], b [Δ, E]) per layer] }.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from .model import Transformer


@dataclasses.dataclass(frozen=True)
class LossConfig:
    mtp_weight: float = 0.3
    mtp_weight_late: float = 0.1
    mtp_late_step: int = 2000  # the step LR decay starts (end of warm-up)
    balance_alpha: float = 1e-4
    bias_gamma: float = 1e-3
    ar_delta: int = 0  # anticipatory-routing lag Δt in steps (0 = ring not kept)
    eos_id: int = 1
    indexer_kl_weight: float = 1.0
    lm_loss: bool = True  # False in the indexer warm-up: the loss is the indexer KL alone


def routed_layers(model: Transformer):
    """The score-routed MoE gates in a fixed order: the stacked slot gates of the main layers (weight
    [R, E, d], bias [R, E]; segment by segment, slot by slot), then the MTP blocks' ([E, d], [E])."""
    slots = [slot.ffn.gate for seg in model.stack for slot in seg]
    return [g for g in slots + [b.ffn.gate for b in model.mtp] if not g.is_hash]


def routed_layer_order(model: Transformer) -> list[int]:
    """Rows of the concatenated per-gate loads ([R, E] per slot gate, then [E] per MTP gate, flattened
    to [sum R + n_mtp, E]) in main-layer order, then the MTP blocks (for per-layer metrics)."""
    offset, where = 0, {}
    for s, (seg, slots) in enumerate(zip(model.plan, model.stack)):
        for j, slot in enumerate(slots):
            if not slot.ffn.gate.is_hash:
                where.update({seg.layer(j, r): offset + r for r in range(seg.reps)})
                offset += seg.reps
    n_mtp = sum(not b.ffn.gate.is_hash for b in model.mtp)
    return [where[i] for i in sorted(where)] + list(range(offset, offset + n_mtp))


def _masked_ce(logits, targets, mask, denom=None):
    """Mean CE over `mask`; over `denom` targets instead when given (a micro-batch's share of a batch)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(ce * mask) / (jnp.maximum(jnp.sum(mask), 1.0) if denom is None else denom)


def target_masks(batch: dict, eos_id: int):
    """(next-token mask [B, T-1], MTP t+2 mask [B, T-2]): predict inside a document, never after an EOS
    (alignment padding follows it)."""
    tok, seg = batch["tokens"], batch["segment_ids"]
    nxt = (seg[:, 1:] == seg[:, :-1]) & (tok[:, :-1] != eos_id)
    return nxt, nxt[:, :-1] & nxt[:, 1:]


def micro_norm(batch: dict, eos_id: int, n_micro: int) -> dict:
    """The whole batch's normalisers for `compute_loss` on one of its `n_micro` micro-batches."""
    nxt, two = target_masks(batch, eos_id)
    return {"ce": jnp.maximum(jnp.sum(nxt.astype(jnp.float32)), 1.0),
            "mtp": jnp.maximum(jnp.sum(two.astype(jnp.float32)), 1.0), "n_micro": n_micro}


def balance_terms(aux: dict, n_experts: int, k: int):
    """-> (per-row balance loss sum_e f_e P_e [..., B], expert counts over the batch [..., E]).

    aux: idx [..., B, T, k], scores [..., B, T, E] (leading dims: stacked layers, if any)."""
    idx, s = aux["idx"], aux["scores"]
    counts_be = jnp.sum(jax.nn.one_hot(idx, n_experts, dtype=jnp.float32), axis=(-3, -2))
    t = idx.shape[-2]
    f = counts_be * (n_experts / (k * t))
    p = jnp.mean(s / jnp.sum(s, axis=-1, keepdims=True), axis=-2)
    return jnp.sum(f * p, axis=-1), jnp.sum(counts_be, axis=-2)


def compute_loss(model: Transformer, batch: dict, lcfg: LossConfig, mtp_weight, stale_routers=None, norm=None):
    """-> (total loss, aux: ce, mtp, balance, expert counts per gate of `routed_layers` ([R, E] or [E])).

    `stale_routers`: one (weight, bias) per gate of `routed_layers`, in its order, or None.
    `norm` (`micro_norm`): `batch` is one micro-batch of a larger batch; the losses are its share of the
    larger batch's (summed over the micro-batches they give the larger batch's losses)."""
    tok, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    norm = norm or {"ce": None, "mtp": None, "n_micro": 1}
    cfg = model.cfg
    stale = iter(stale_routers) if stale_routers is not None else None
    take = lambda gate: None if stale is None or gate.is_hash else next(stale)  # noqa: E731
    main_stale = [[take(slot.ffn.gate) for slot in slots] for slots in model.stack]
    out = model(tok, positions=pos, segment_ids=seg, stale_routers=main_stale)
    pairs = [(a, slot.ffn.gate) for auxes, slots in zip(out["aux_stacked"], model.stack) for a, slot in zip(auxes, slots)]
    nxt, two = target_masks(batch, lcfg.eos_id)
    ce = _masked_ce(out["logits"][:, :-1], tok[:, 1:], nxt.astype(jnp.float32), norm["ce"])
    mtp = jnp.float32(0.0)
    if cfg.n_mtp:
        gate = model.mtp[0].ffn.gate
        mtp_logits, _, aux = model.mtp_logits(out["streams"][:, :-1], tok[:, 1:], positions=pos[:, :-1],
                                              segment_ids=seg[:, :-1], stale_router=take(gate))
        pairs.append((aux, gate))
        mtp = _masked_ce(mtp_logits[:, :-1], tok[:, 2:], two.astype(jnp.float32), norm["mtp"])
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    bal, counts = jnp.float32(0.0), []
    for a, g in pairs:
        if not g.is_hash:
            row_loss, c = balance_terms(a, e, k)
            bal = bal + jnp.sum(jnp.mean(row_loss, axis=-1))  # mean over rows, summed over layers
            counts.append(c)
    kl = sum(jnp.sum(a["indexer_kl"]) for a, _ in pairs)  # 0 unless the model computes the indexer loss
    if norm["n_micro"] > 1:  # per-row means: a micro-batch holds 1/n_micro of the rows
        bal, kl = bal / norm["n_micro"], kl / norm["n_micro"]
    loss = lcfg.indexer_kl_weight * kl
    if lcfg.lm_loss:
        loss = loss + ce + mtp_weight * mtp + lcfg.balance_alpha * bal
    return loss, {"ce": ce, "mtp": mtp, "balance": bal, "indexer_kl": kl, "counts": counts}


def update_balance_biases(model: Transformer, counts, gamma: float):
    """b_e += gamma * sign(mean load - load_e) for every score-routed layer (in place on `model`)."""
    for gate, c in zip(routed_layers(model), counts):  # c [E] or [R, E] (stacked rows)
        load = c / jnp.maximum(jnp.sum(c, axis=-1, keepdims=True), 1.0)
        gate.bias[...] = gate.bias[...] + gamma * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)


def init_router_ring(model: Transformer, delta: int):
    return [(jnp.broadcast_to(g.weight[...], (delta,) + g.weight.shape),
             jnp.broadcast_to(g.bias[...], (delta,) + g.bias.shape)) for g in routed_layers(model)]


def init_train_state(model: Transformer, tx, lcfg: LossConfig) -> dict:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ring = init_router_ring(model, lcfg.ar_delta) if lcfg.ar_delta > 0 else []
    return {"params": params, "rest": rest, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "router_ring": ring}


def indexer_only_mask(params):
    """1.0 for the lightning indexers' parameters, 0.0 elsewhere (the recipe's indexer warm-up)."""
    return nnx.from_flat_state([(p, v.replace(jnp.asarray(float("indexer" in p), jnp.float32)))
                                for p, v in nnx.to_flat_state(params)])


def split_micro(batch: dict, n_micro: int) -> dict:
    """[R, ...] -> [n_micro, R / n_micro, ...], row r in micro-batch r mod n_micro (a batch sharded by
    rows keeps every micro-batch's rows on the devices that hold them)."""
    def one(x):
        if x.shape[0] % n_micro:
            raise ValueError(f"{x.shape[0]} rows do not split into {n_micro} micro-batches")
        return jnp.swapaxes(x.reshape((x.shape[0] // n_micro, n_micro) + x.shape[1:]), 0, 1)
    return jax.tree.map(one, batch)


def make_train_step(graphdef, tx, lcfg: LossConfig, state_sharding=None, batch_sharding=None, train_mask=None,
                    grad_accum: int = 1, compiler_options: dict | None = None):
    """jit((train state, batch, ar_active) -> (train state, metrics)) with the state donated.

    `train_mask` (a params-shaped pytree of 0/1) freezes the parameters where it is 0. `grad_accum` > 1:
    the batch is that many micro-batches whose gradients a scan sums (see the module docstring); `tx`
    must then be a plain optimiser (no MultiSteps), one update per call. jit compiles once per batch
    shape (sequence-length stages) and keeps every compiled version. `compiler_options`: XLA options for
    the compiled program (jax.jit's; e.g. {"xla_backend_optimization_level": 0} compiles a CPU step
    about twice as fast, for short runs such as tests)."""
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")

    def step(ts, batch, ar_active):
        stale, slot = None, None
        if lcfg.ar_delta > 0:
            slot = ts["step"] % lcfg.ar_delta  # written ar_delta steps ago
            cur = [(g.weight[...], g.bias[...]) for g in routed_layers(nnx.merge(graphdef, ts["params"], ts["rest"]))]
            stale = [(jnp.where(ar_active, w[slot], cw), jnp.where(ar_active, b[slot], cb))
                     for (w, b), (cw, cb) in zip(ts["router_ring"], cur)]
        mtp_w = jnp.where(ts["step"] >= lcfg.mtp_late_step, lcfg.mtp_weight_late, lcfg.mtp_weight)

        def grads_of(mb, norm=None):
            def loss_fn(params):
                return compute_loss(nnx.merge(graphdef, params, ts["rest"]), mb, lcfg, mtp_w, stale, norm)
            return jax.value_and_grad(loss_fn, has_aux=True)(ts["params"])

        if grad_accum == 1:
            (loss, aux), grads = grads_of(batch)
        else:
            norm = micro_norm(batch, lcfg.eos_id, grad_accum)
            micro = split_micro(batch, grad_accum)
            # fp32 sums, shaped like compute_loss's outputs (built by hand: tracing the model costs seconds)
            zero = jnp.zeros((), jnp.float32)
            model = nnx.merge(graphdef, ts["params"], ts["rest"])
            counts = [jnp.zeros(g.bias.shape, jnp.float32) for g in routed_layers(model)]
            acc = ((zero, {"ce": zero, "mtp": zero, "balance": zero, "indexer_kl": zero, "counts": counts}),
                   jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), ts["params"]))

            def body(acc, mb):
                return jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc, grads_of(mb, norm)), None

            ((loss, aux), grads), _ = jax.lax.scan(body, acc, micro)
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, ts["params"])
        updates, opt = tx.update(grads, ts["opt"], ts["params"])
        if train_mask is not None:
            updates = jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, train_mask)
        params = optax.apply_updates(ts["params"], updates)
        model = nnx.merge(graphdef, params, ts["rest"])
        update_balance_biases(model, aux["counts"], lcfg.bias_gamma)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        ring = ts["router_ring"]
        if lcfg.ar_delta > 0:
            ring = [(w.at[slot].set(g.weight[...]), b.at[slot].set(g.bias[...]))
                    for (w, b), g in zip(ring, routed_layers(model))]
        loads = None
        if aux["counts"]:  # [routed layers, E] in layer order
            flat = jnp.concatenate([c.reshape(-1, c.shape[-1]) for c in aux["counts"]])
            loads = (flat / jnp.maximum(jnp.sum(flat, axis=-1, keepdims=True), 1.0))[jnp.asarray(routed_layer_order(model))]
        metrics = {"loss": loss, "ce": aux["ce"], "mtp": aux["mtp"], "balance": aux["balance"],
                   "indexer_kl": aux["indexer_kl"],
                   "grad_norm": optax.tree.norm(grads)}
        if loads is not None:  # max load / mean load per routed layer (1 = perfectly balanced)
            metrics["max_load_ratio"] = jnp.max(loads, axis=-1) * loads.shape[-1]
            metrics["expert_load"] = loads  # [routed layers, E], each row sums to 1 (the dashboards' image)
        new = {"params": params, "rest": rest, "opt": opt, "step": ts["step"] + 1, "router_ring": ring}
        return new, metrics

    kw = {}
    if state_sharding is not None:
        kw = dict(in_shardings=(state_sharding, batch_sharding, None), out_shardings=(state_sharding, None))
    return jax.jit(step, donate_argnums=(0,), compiler_options=compiler_options, **kw)
