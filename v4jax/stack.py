"""The scanned layer stack: layers of one kind share one compiled body, whatever the depth.

A layer's *kind* is what changes its parameters' structure: its compression ratio (SWA 0, CSA 4,
HCA m) and whether its router is a hash table. `layer_plan` cuts the main layers into segments, each
a period of kinds repeated `reps` times:

  Flash (43 layers, 3 hash):  [SWA#]x2, [CSA#]x1, [HCA, CSA]x20      (# = hash-routed)
  Pro   (61 layers, 3 hash):  [HCA#]x2, [CSA#]x1, [HCA, CSA]x29
  tiny  (4 layers, 1 hash):   [SWA#]x1, [CSA]x1, [HCA]x1, [CSA]x1

Segment s keeps one Block per slot j of its period, every parameter stacked along a new leading axis
of `reps` rows (logical axis "layers", replicated: each device holds its shard of every layer):
slot j, row r is main layer `first + r * period + j`. The full-sequence forward (training, scoring)
runs a segment as one `lax.scan` over r whose body applies the period's blocks in order, so the
program holds each kind once. Stateful calls (prefill chunks, decode) run the layers one by one on
row views of the stacked parameters, because every layer updates its own decode-state buffers in
place (a scan would carry them whole through every iteration).

Shapes through one segment (B batch, T tokens, n streams, d width, P period, R reps):
  x_btnd   [B, T, n, d]            carried from row to row
  params   [R, ...] per slot       scanned over (a dynamic slice per row)
  stale    [R, E, d], [R, E]       per routed slot, the anticipatory-routing routers (or None)
  aux      {idx [R,B,T,k], scores [R,B,T,E], topk, indexer_kl [R]} per slot, stacked by the scan
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .sharding import LAYERS_AXIS, batch_sharded, gathered
MAX_PERIOD = 4


@dataclasses.dataclass(frozen=True)
class Segment:
    first: int  # first main layer
    period: int  # slots
    reps: int  # rows

    def layer(self, slot: int, row: int) -> int:
        return self.first + row * self.period + slot


def layer_kind_key(cfg, layer: int) -> tuple[int, bool]:
    return cfg.layer_ratio(layer), cfg.is_hash_layer(layer)


def layer_plan(cfg, scan: bool = True) -> tuple[Segment, ...]:
    """Greedy cut of the main layers into repeated periods (longest run covered first; periods of up
    to MAX_PERIOD kinds, repeated at least twice; otherwise a segment of one layer). `scan=False`: one
    segment per layer (the unrolled stack)."""
    kinds = [layer_kind_key(cfg, i) for i in range(cfg.num_hidden_layers)]
    out, i = [], 0
    while i < len(kinds):
        best = (1, 1)
        for p in range(1, MAX_PERIOD + 1) if scan else ():
            r = 1
            while i + (r + 1) * p <= len(kinds) and kinds[i + r * p: i + (r + 1) * p] == kinds[i: i + p]:
                r += 1
            if r >= 2 and p * r > best[0] * best[1]:
                best = (p, r)
        out.append(Segment(i, *best))
        i += best[0] * best[1]
    return tuple(out)


def stack_modules(blocks: list, seg: Segment) -> nnx.List:
    """One module per slot of `seg`, each Variable the stack of the slot's rows (axis "layers" first)."""
    slots = []
    for j in range(seg.period):
        rows = [blocks[seg.layer(j, r)] for r in range(seg.reps)]
        graphdef = nnx.graphdef(rows[0])
        states = [nnx.state(m) for m in rows]
        stacked = jax.tree.map(_stack_vars, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
        slots.append(nnx.merge(graphdef, stacked))
    return nnx.List(slots)


def _stack_vars(*vs):
    meta = vs[0].get_metadata()
    axes = meta.get("axes") or (None,) * vs[0].ndim
    return vs[0].replace(jnp.stack([v[...] for v in vs]), axes=(LAYERS_AXIS,) + tuple(axes))


def row_view(module, row):
    """The slot module with every Variable at stacked row `row` (a static or traced index; abstract
    leaves stay abstract), its leading "layers" axis dropped from the metadata."""
    graphdef, state = nnx.split(module)

    def one(var):
        v = var.get_value()
        v = jax.ShapeDtypeStruct(v.shape[1:], v.dtype) if isinstance(v, jax.ShapeDtypeStruct) else v[row]
        return var.replace(v, axes=tuple(var.get_metadata().get("axes") or (None,) * var.ndim)[1:])

    return nnx.merge(graphdef, jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def run_segment(slots, x, body, xs_per_slot, remat: bool = False):
    """Scan `body(block, x, slot_xs) -> (x, out)` over the rows of a segment's slots.

    `xs_per_slot[j]`: a pytree with leading dim reps (or None) handed to slot j's call at each row.
    -> (x, [stacked out per slot]). With `remat` each row's blocks are rematerialised in the
    backward (only the carried streams are kept per row)."""
    split = [nnx.split(m) for m in slots]

    def step(x, xs):
        states, extra = xs
        states = [gathered(st) for st in states]
        x = batch_sharded(x)
        outs = []
        for (graphdef, _), st, e in zip(split, states, extra):
            x, o = body(nnx.merge(graphdef, st), x, e)
            outs.append(o)
        return x, outs

    if remat:
        step = jax.checkpoint(step, policy=jax.checkpoint_policies.nothing_saveable)
    return jax.lax.scan(step, x, ([st for _, st in split], list(xs_per_slot)))


def restack_pure(tree: dict, plan) -> dict:
    """A pure dict of the unrolled layout ({"layers": {i: block tree}, ...}, what v4jax wrote before the
    scanned stack) -> the stacked layout ({"stack": {s: {j: block tree with [R, ...] leaves}}, ...})."""
    if "layers" not in tree:
        return tree
    layers = {int(k): v for k, v in tree["layers"].items()}
    out = {k: v for k, v in tree.items() if k != "layers"}
    out["stack"] = {s: {j: jax.tree.map(lambda *rows: np.stack(rows), *[layers[seg.layer(j, r)] for r in range(seg.reps)])
                        for j in range(seg.period)} for s, seg in enumerate(plan)}
    return out


def n_layer_axes(var) -> int:
    """Leading stacked-row axes of a Variable (0 for an unstacked one)."""
    axes = tuple(var.get_metadata().get("axes") or ())
    n = 0
    while n < len(axes) and axes[n] == LAYERS_AXIS:
        n += 1
    return n
