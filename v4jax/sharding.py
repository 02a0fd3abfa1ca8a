"""One table maps logical axes (declared where each parameter is created) to mesh axes.

Mesh axes: `data` (batch), `fsdp` (batch + weight sharding), `expert` (routed experts), `tensor`
(heads, expert FFN width, vocabulary). A mesh axis that does not divide a dimension is dropped for
that parameter (it is replicated along it) so tiny configs shard on any mesh.

At rest parameters are sharded by the table (fsdp included); in use (`gathered`, inside each scanned
row and the MTP block) they are constrained to the table without the fsdp axis, and activations
between rows to the batch axes (`batch_sharded`): FSDP's gather-weights-per-layer, written down so
XLA's propagation cannot choose to gather a batch of activations instead.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")
FSDP_AXES = ("fsdp",)  # mesh axes that shard weights only at rest: gathered for use (`gathered`)
LAYERS_AXIS = "layers"  # logical axis of the stacked rows of a scanned segment (v4jax.stack)

# logical axis -> mesh axis (or tuple of mesh axes), None = replicated
RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations' batch: over the expert axis too (MoE layers regroup the tokens by expert inside
    # shard_map; elsewhere an expert axis left out of the batch would repeat every dense layer's work)
    "batch": ("data", "fsdp", "expert"),
    LAYERS_AXIS: None,  # stacked rows of a scanned segment (v4jax.stack): every device holds every layer
    "vocab": "tensor",
    "embed": "fsdp",
    "embed_out": None,
    "q_lora": "fsdp",  # wq_b / indexer wq_b [heads x dim, q_lora] have no embed dim: fsdp shards q_lora
    "heads_dim": "tensor",  # n_h * head_dim, query heads
    "heads": "tensor",
    "kv": None,
    "o_in": "fsdp",  # wo_a [groups x o_lora (tensor), heads x dim / groups]
    "o_lora": "tensor",
    "idx_heads_dim": "tensor",
    "idx_heads": "tensor",
    "comp_out": None,
    "ratio": None,
    "experts": "expert",
    "experts_r": None,  # router rows: every device routes
    "moe_mlp": "tensor",
    "hc_mix": None,
    "hc_head": None,
    "hc_dim": None,
    "hc_gate": None,
    "norm": None,
    "vocab_r": None,
    "topk": None,
}


def parse_mesh(spec: str | None) -> dict[str, int]:
    """"data=2,expert=2,tensor=2" -> {"data": 2, "fsdp": 1, "expert": 2, "tensor": 2}."""
    sizes = {a: 1 for a in MESH_AXES}
    if spec:
        for part in spec.split(","):
            name, _, val = part.partition("=")
            name = name.strip()
            if name not in sizes or not val.strip().isdigit():
                raise ValueError(f"bad --mesh entry '{part}': use axis=N with axis in {MESH_AXES}")
            sizes[name] = int(val)
    return sizes


def make_mesh(spec: str | dict | None = None, devices=None) -> Mesh:
    sizes = parse_mesh(spec) if not isinstance(spec, dict) else {a: spec.get(a, 1) for a in MESH_AXES}
    devices = list(devices if devices is not None else jax.devices())
    n = math.prod(sizes.values())
    if spec is None:
        sizes["data"], n = 1, 1
    if n > len(devices):
        raise ValueError(f"mesh {sizes} needs {n} devices, only {len(devices)} available")
    arr = np.array(devices[:n]).reshape(tuple(sizes[a] for a in MESH_AXES))
    return Mesh(arr, MESH_AXES)


def spec_for(axes, shape, mesh) -> P:
    """PartitionSpec for logical `axes` of an array of `shape` on `mesh` (non-dividing axes dropped)."""
    used: set[str] = set()
    out = []
    for name, dim in zip(axes, shape):
        rule = RULES.get(name) if name is not None else None
        if name is not None and name not in RULES:
            raise KeyError(f"logical axis '{name}' has no sharding rule")
        mesh_axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
        keep = []
        for a in mesh_axes:
            size = mesh.shape[a]
            if size > 1 and a not in used and dim % (size * math.prod(mesh.shape[k] for k in keep)) == 0:
                keep.append(a)
        used.update(keep)
        out.append(None if not keep else (keep[0] if len(keep) == 1 else tuple(keep)))
    return P(*out)


def rule_shape(var, shape=None) -> tuple:
    """The shape the rules divide for a Variable: its own, or for native quantised weights and their
    scales the number of scale blocks per dim (`native.shard_shape`: a shard never splits a block),
    with any leading stacked-row dims of `shape` in front."""
    shape = tuple(var.shape if shape is None else shape)
    blocks = var.get_metadata().get("shard_shape")
    if blocks is None:
        return shape
    return shape[:len(shape) - len(blocks)] + tuple(blocks)


def state_shardings(state: nnx.State, mesh: Mesh):
    """NamedSharding for every Variable of an (abstract or concrete) nnx.State, from its `axes`."""
    def one(var):
        axes = var.get_metadata().get("axes") or (None,) * len(var.shape)
        return var.replace(NamedSharding(mesh, spec_for(axes, rule_shape(var), mesh)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Batch-first arrays: dim 0 over RULES["batch"] (data, fsdp, expert) where those divide it, the
    rest replicated."""
    return NamedSharding(mesh, spec_for(("batch",) + (None,) * (len(shape) - 1), shape, mesh))


def gathered(state, stacked: bool = True):
    """Parameters (an nnx.State) as one row uses them, under the context mesh: FSDP-gathered, i.e.
    constrained to the rules table's sharding without its fsdp axis (expert and tensor axes kept), and,
    for a scanned row (`stacked`), without the leading "layers" axis. Pinned inside a row's body
    (`stack.run_segment`), XLA gathers each layer's weights there, one layer at a time, instead of
    gathering the batch of activations (or hoisting a gather of the whole [R, ...] stack out of the
    loop: every layer's gathered weights at once)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return state

    def one(var):
        axes = tuple(var.get_metadata().get("axes") or ())
        v = var.get_value()
        if stacked and axes[:1] == (LAYERS_AXIS,):
            axes = axes[1:]
        if len(axes) != v.ndim:
            return var
        spec = [_without(a, FSDP_AXES) for a in spec_for(axes, rule_shape(var, v.shape), mesh)]
        return var.replace(jax.lax.with_sharding_constraint(v, jax.sharding.NamedSharding(mesh, P(*spec))))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _without(entry, drop):
    """A PartitionSpec entry (None, an axis, or a tuple of axes) without the mesh axes in `drop`."""
    kept = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a not in drop)
    return None if not kept else kept[0] if len(kept) == 1 else kept


def batch_sharded(x):
    """Activations [B, ...] constrained to the batch axes of the rules table (no-op without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = spec_for(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))
