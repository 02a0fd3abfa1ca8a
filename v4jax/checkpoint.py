"""Loading DeepSeek-V4 checkpoints in the hub format (config.json + *.safetensors).

* Reads single-file or sharded (`model.safetensors.index.json`) checkpoints through a small
  memory-mapped safetensors reader (the `safetensors` package's NumPy backend cannot represent
  F8_E4M3 / F8_E8M0), so tensors stream from disk one at a time.
* Accepts the name variants DeepSeek's converter accepts: a `model.` prefix, `weight_scale_inv`
  for `scale`, `self_attn` / `mlp` for `attn` / `ffn`, `e_score_correction_bias` for `bias`.
* Decodes FP8 (128x128 UE8M0 blocks) and packed FP4 (1x32 UE8M0 blocks) to the parameter dtype.
* Every parameter is built with `jax.make_array_from_callback` on its target sharding: each device
  shard reads only its slice (for stacked experts, only its experts), so host memory never holds
  the model twice.
* A table of expected tensors comes from the model itself; an unknown, missing or wrongly shaped
  tensor is a `CheckpointError` naming it.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import struct

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from . import quant
from .config import ModelConfig
from .model import Transformer, abstract
from .sharding import state_shardings


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or is damaged."""


_DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E8M0": np.uint8, "F8_E5M2": ml_dtypes.float8_e5m2,
}


# -------------------------------------------------------------------- safetensors reading
class SafetensorsDir:
    """Tensor headers of every shard in a directory; `read(name)` memory-maps one tensor."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(fn for fn in os.listdir(path) if fn.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors files")
        self.entries: dict[str, tuple[str, str, tuple, int, int]] = {}
        for fn in files:
            self._read_header(os.path.join(path, fn))
        self._maps: dict[str, np.memmap] = {}

    def _read_header(self, file: str):
        if not os.path.exists(file):
            raise CheckpointError(f"missing shard {file}")
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{file}: truncated (no safetensors header)")
            n = struct.unpack("<Q", raw)[0]
            if n > size - 8:
                raise CheckpointError(f"{file}: corrupt header length {n}")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
        base = 8 + n
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            begin, end = meta["data_offsets"]
            if base + end > size:
                raise CheckpointError(f"{file}: tensor '{name}' extends past the end of the file (truncated?)")
            if meta["dtype"] not in _DTYPES:
                raise CheckpointError(f"tensor '{name}': unsupported dtype {meta['dtype']}")
            self.entries[name] = (file, meta["dtype"], tuple(meta["shape"]), base + begin, base + end)

    def read(self, name: str) -> np.ndarray:
        file, dtype, shape, begin, end = self.entries[name]
        if file not in self._maps:
            self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
        buf = self._maps[file][begin:end]
        return buf.view(_DTYPES[dtype]).reshape(shape)

    def dtype(self, name: str) -> str:
        return self.entries[name][1]

    def shape(self, name: str) -> tuple:
        return self.entries[name][2]


def canonical_name(name: str) -> str:
    """Official-converter name variants -> canonical official inference names."""
    if name.startswith("model."):
        name = name[len("model."):]
    name = name.replace(".self_attn.", ".attn.").replace(".mlp.", ".ffn.")
    name = re.sub(r"\.weight_scale_inv$", ".scale", name)
    name = name.replace("e_score_correction_bias", "bias")
    return name


# -------------------------------------------------------------------- expected-tensor table
_HC = re.compile(r"(^|\.)(hc_attn|hc_ffn|hc_head)\.(fn|base|scale)$")


def param_path_to_names(path: tuple, shape: tuple, plan=()) -> list[tuple[str, tuple[int, ...]]]:
    """Model state path -> checkpoint names [(name, index into the leading stacked dims)].

    `stack.s.j.<rest>` [R, ...] (the scanned layer stack, `plan` = the model's `layer_plan`) holds
    `layers.<plan[s].layer(j, r)>.<rest>` at row r; routed experts `...experts.w1` [(R,) E, ...] hold
    `...experts.<e>.w1.weight` at index e."""
    rows = [("", ())]
    if path[0] == "stack":
        seg, j = plan[int(path[1])], int(path[2])
        rows = [(f"layers.{seg.layer(j, r)}.", (r,)) for r in range(seg.reps)]
        path = path[3:]
    dotted = ".".join(str(p) for p in path)
    if ".experts.w" in dotted:  # stacked routed experts: ffn.experts.w1 -> per-expert tensors
        head, w = dotted.rsplit(".", 1)
        n_experts = shape[len(rows[0][1])]
        return [(f"{pre}{head}.{e}.{w}.weight", idx + (e,)) for pre, idx in rows for e in range(n_experts)]
    m = _HC.search(dotted)
    if m:
        dotted = dotted[: m.start(2)] + f"{m.group(2)}_{m.group(3)}"
    return [(pre + dotted, idx) for pre, idx in rows]


def expected_tensors(model_or_cfg) -> dict[str, tuple[tuple, tuple[int, ...], tuple]]:
    """canonical checkpoint name -> (model path, index into its stacked dims, tensor shape)."""
    model = abstract(model_or_cfg) if isinstance(model_or_cfg, ModelConfig) else model_or_cfg
    table = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        shape = tuple(var.shape)
        for name, idx in param_path_to_names(path, shape, model.plan):
            table[name] = (path, idx, shape[len(idx):])
    return table


def hub_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """The model's tensors under their checkpoint names, as host arrays of the parameter dtype (the
    inverse of `load_hub`'s mapping; scale-free: what a bf16/fp32 hub checkpoint holds)."""
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    return {name: np.asarray(flat[p].get_value()[idx]) for name, (p, idx, _) in expected_tensors(model).items()}


def relayout(model: Transformer, **runtime) -> Transformer:
    """The same weights in another layer layout (e.g. `scan_layers=False`: one segment per layer, what
    the decode engine runs, since its layers update their own state one by one and a row of a stacked
    weight would be sliced out, i.e. copied, at every step). Row r of stacked slot (s, j) is layer
    `plan[s].layer(j, r)` in both layouts; arrays keep their devices and shardings."""
    import jax.numpy as jnp
    cfg = model.cfg.with_runtime(**runtime)
    target = abstract(cfg)
    old = dict(nnx.to_flat_state(nnx.state(model)))
    where = model.layer_index()
    new = []
    for path, var in nnx.to_flat_state(nnx.state(target)):
        if path[0] != "stack":
            new.append((path, var.replace(old[path].get_value())))
            continue
        seg, j, rest = target.plan[int(path[1])], int(path[2]), path[3:]
        rows = []
        for r in range(seg.reps):
            s_old, j_old, r_old = where[seg.layer(j, r)]
            rows.append(old[("stack", s_old, j_old) + rest].get_value()[r_old])
        new.append((path, var.replace(jnp.stack(rows))))
    return nnx.merge(nnx.graphdef(target), nnx.from_flat_state(new))


# -------------------------------------------------------------------- decoding one tensor
def decode_tensor(st: SafetensorsDir, name: str, want_shape: tuple) -> np.ndarray:
    """Reads tensor `name` (plus its `.scale`) and returns float32 / int values of `want_shape`."""
    raw_name = st.names[name]
    dt, shape = st.dtype(raw_name), st.shape(raw_name)
    scale_name = st.names.get(name[: -len(".weight")] + ".scale") if name.endswith(".weight") else None
    if dt == "F8_E4M3":
        if scale_name is None:
            raise CheckpointError(f"tensor '{name}' is FP8 but has no '.scale' companion")
        _check_shape(name, shape, want_shape)
        want_scale = tuple(-(-s // 128) for s in want_shape)
        _check_shape(name[:-7] + ".scale", st.shape(scale_name), want_scale)
        return quant.dequant_fp8_weight(st.read(raw_name), st.read(scale_name))
    if dt == "I8" and scale_name is not None:  # packed FP4, [N, K/2] + scale [N, K/32]
        _check_shape(name, (shape[0], shape[1] * 2), want_shape)
        _check_shape(name[:-7] + ".scale", st.shape(scale_name), (want_shape[0], -(-want_shape[1] // 32)))
        return quant.dequant_fp4_weight(st.read(raw_name), st.read(scale_name))
    _check_shape(name, shape, want_shape)
    arr = st.read(raw_name)
    if arr.dtype.kind in "iu":
        return arr
    return arr.astype(np.float32)


def _check_shape(name, got, want):
    if tuple(got) != tuple(want):
        raise CheckpointError(f"tensor '{name}' has shape {list(got)}, the config expects {list(want)}")


# -------------------------------------------------------------------- loading a model
_IGNORABLE = re.compile(r"^mtp\.\d+\.(emb\w*|embed)\.weight$|^mtp\.\d+\.head\.weight$")


def load_hub(path: str, cfg: ModelConfig | None = None, mesh=None, **runtime) -> Transformer:
    """Model with the weights of a hub-format directory, sharded on `mesh` (default: one device)."""
    if cfg is None:
        cfg = ModelConfig.from_hub(path, **runtime)
    st = SafetensorsDir(path)
    st.names = {canonical_name(n): n for n in st.entries}
    skeleton = abstract(cfg)
    table = expected_tensors(skeleton)
    _check_names(st, table)
    graphdef, abs_state = nnx.split(skeleton)
    if mesh is None:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), ("data", "fsdp", "expert", "tensor"))
    shardings = state_shardings(abs_state, mesh)
    by_path: dict[tuple, list[tuple[str, tuple[int, ...]]]] = {}
    for name, (p, e, _) in table.items():
        by_path.setdefault(p, []).append((name, e))

    flat_sh = dict(nnx.to_flat_state(shardings))
    new = nnx.from_flat_state([
        (p, v.replace(_build_array(st, by_path[p], v, flat_sh[p].get_value())))
        for p, v in nnx.to_flat_state(abs_state)])
    return nnx.merge(graphdef, new)


def _check_names(st: SafetensorsDir, table: dict):
    have = set(st.names)
    scales = {n for n in have if n.endswith(".scale") and n[:-6] + ".weight" in have}
    unknown = sorted(n for n in have - scales - set(table) if not _IGNORABLE.match(n))
    if unknown:
        raise CheckpointError(f"unknown tensor '{unknown[0]}' in checkpoint ({len(unknown)} unknown in all) "
                              "— does the checkpoint match its config.json?")
    missing = sorted(set(table) - have)
    if missing:
        raise CheckpointError(f"missing tensor '{missing[0]}' ({len(missing)} missing in all)")


def _build_array(st: SafetensorsDir, names, var, sharding) -> jax.Array:
    """One model array from its checkpoint tensors: `names` [(name, index into the leading stacked
    dims)]; each device shard reads only the tensors (layers, experts) and the slice it holds."""
    shape, dtype = tuple(var.shape), var.dtype
    lead = len(names[0][1])
    by_index = {idx: name for name, idx in names}
    cache: dict[str, np.ndarray] = {}

    def tensor(name):
        if name not in cache:
            cache.clear()  # keep at most one decoded tensor in host memory
            cache[name] = decode_tensor(st, name, shape[lead:])
        return cache[name]

    def callback(index):
        if not lead:
            return np.asarray(tensor(names[0][0])[index]).astype(dtype)
        ranges = [range(*index[k].indices(shape[k])) for k in range(lead)]
        parts = [tensor(by_index[idx])[index[lead:]] for idx in itertools.product(*ranges)]
        out_shape = tuple(len(r) for r in ranges) + parts[0].shape
        return np.stack(parts).reshape(out_shape).astype(dtype)

    return jax.make_array_from_callback(shape, sharding, callback)
