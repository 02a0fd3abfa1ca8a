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
* Damaged or hostile files are refused, naming the file and the tensor: every safetensors header entry
  is validated when it is read (offsets, shape x itemsize, overlaps, one name in two places), index
  shards must lie inside the directory, each tensor's stored dtype must fit its role
  (`expected_dtypes`), and a NaN / Inf in a weight or scale is found the first time it is read.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import struct
import sys

import jax
import ml_dtypes
import numpy as np
import tqdm
from flax import nnx

from . import native, quant
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
_MAX_HEADER = 100 << 20  # bytes of JSON (the safetensors format's own limit)
_INDEX = "model.safetensors.index.json"


class SafetensorsDir:
    """Tensor headers of every shard in a directory; `read(name)` memory-maps one tensor.

    Every header is validated when it is read (`_header_entries`); a tensor name (or two names of one
    canonical tensor) in two places, or an index entry its shard does not hold, is a CheckpointError."""

    def __init__(self, path: str):
        self.path = path
        files, weight_map = _shard_files(path)
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors files")
        self.entries: dict[str, tuple[str, str, tuple, int, int]] = {}
        for fn in files:
            self._read_header(os.path.join(path, fn))
        for name, fn in (weight_map or {}).items():
            held = self.entries.get(name)
            if held is None or held[0] != os.path.join(path, os.path.normpath(fn)):
                raise CheckpointError(f"{os.path.join(path, _INDEX)}: lists tensor '{name}' in {fn}, "
                                      "which does not hold it")
        self.names: dict[str, str] = {}
        for raw in self.entries:
            other = self.names.setdefault(canonical_name(raw), raw)
            if other != raw:
                raise CheckpointError(f"tensors '{other}' ({self.entries[other][0]}) and '{raw}' "
                                      f"({self.entries[raw][0]}) are both '{canonical_name(raw)}'")
        self._maps: dict[str, np.memmap] = {}
        self._checked: set[str] = set()

    def _read_header(self, file: str):
        entries, base = _header_entries(file)
        for name, (dtype, shape, begin, end) in entries.items():
            if name in self.entries:
                raise CheckpointError(f"tensor '{name}' is in two shards: {self.entries[name][0]} and {file}")
            self.entries[name] = (file, dtype, shape, base + begin, base + end)

    def read(self, name: str) -> np.ndarray:
        """The stored tensor (a read-only memory map); its first read checks that it holds no NaN / Inf."""
        file, dtype, shape, begin, end = self.entries[name]
        if file not in self._maps:
            self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
        buf = self._maps[file][begin:end]
        if name not in self._checked:
            at = _first_nonfinite(buf, dtype, scale=canonical_name(name).endswith(".scale"))
            if at is not None:
                raise CheckpointError(f"{file}: tensor '{name}' holds a NaN or Inf ({dtype} element {at})")
            self._checked.add(name)
        return buf.view(_DTYPES[dtype]).reshape(shape)

    def dtype(self, name: str) -> str:
        return self.entries[name][1]

    def shape(self, name: str) -> tuple:
        return self.entries[name][2]


def _shard_files(path: str) -> tuple[list[str], dict | None]:
    """Shard file names (relative to `path`) and the index's weight_map (None without an index)."""
    index = os.path.join(path, _INDEX)
    if not os.path.exists(index):
        return sorted(fn for fn in os.listdir(path) if fn.endswith(".safetensors")), None
    try:
        with open(index, "rb") as f:
            raw = json.loads(f.read())
    except (OSError, ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{index}: not a readable JSON index file") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: needs a 'weight_map' object (tensor name -> shard file name)")
    for fn in set(weight_map.values()):
        parts = fn.replace("\\", "/").split("/")
        if not fn or "\0" in fn or os.path.isabs(fn) or ".." in parts:
            raise CheckpointError(f"{index}: shard {fn[:200]!r} is not inside the checkpoint directory "
                                  "(absolute paths and '..' are refused)")
    return sorted({os.path.normpath(fn) for fn in weight_map.values()}), weight_map


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _header_json(file: str) -> tuple[dict, int, int]:
    """(header object, offset of the data buffer, file size); messages never echo the file's bytes."""
    if not os.path.isfile(file):
        raise CheckpointError(f"missing shard {file}" if not os.path.exists(file) else f"{file}: not a file")
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{file}: not a safetensors file (shorter than its 8-byte header length; "
                                  "truncated?)")
        n = struct.unpack("<Q", raw)[0]
        if n > size - 8:
            raise CheckpointError(f"{file}: not a safetensors file (header length field larger than the file; "
                                  "truncated?)")
        if n > _MAX_HEADER:
            raise CheckpointError(f"{file}: not a safetensors file (header longer than {_MAX_HEADER >> 20} MiB)")
        text = f.read(n)
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise CheckpointError(f"{file}: key '{str(e)[:200]}' appears twice in the safetensors header") from None
    except (ValueError, RecursionError):
        raise CheckpointError(f"{file}: corrupt safetensors header (not UTF-8 JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    if not isinstance(header.get("__metadata__", {}), dict):
        raise CheckpointError(f"{file}: corrupt safetensors header ('__metadata__' is not an object)")
    return header, 8 + n, size


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _header_entries(file: str) -> tuple[dict[str, tuple[str, tuple, int, int]], int]:
    """{name: (dtype, shape, begin, end)} (offsets relative to the data buffer) and the buffer's offset,
    every entry checked against the file size, its shape and dtype, and the other entries."""
    header, base, size = _header_json(file)
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        where = f"{file}: tensor '{name[:200]}'"
        if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= meta.keys():
            raise CheckpointError(f"{where}: a header entry needs 'dtype', 'shape' and 'data_offsets'")
        dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: shape is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets)):
            raise CheckpointError(f"{where}: data_offsets is not a pair of integers")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] are not 0 <= begin <= end")
        if end > size - base:
            raise CheckpointError(f"{where} extends past the end of the file (truncated?)")
        want = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
        if end - begin != want:
            raise CheckpointError(f"{where}: data_offsets span {end - begin} bytes, {dtype} {shape} is {want}")
        entries[name] = (dtype, tuple(shape), begin, end)
    spans = sorted((b, e, n) for n, (_, _, b, e) in entries.items() if e > b)
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{file}: tensors '{n0[:200]}' and '{n1[:200]}' overlap in the file")
    return entries, base


# bit patterns of the non-finite values: x & mask == mask (IEEE: exponent all ones; e4m3fn: only
# S.1111.111 is NaN; UE8M0: 0xFF); integer tensors and packed FP4 (I8) have none
_NONFINITE = {"F64": (np.uint64, 0x7FF0000000000000), "F32": (np.uint32, 0x7F800000),
              "BF16": (np.uint16, 0x7F80), "F16": (np.uint16, 0x7C00), "F8_E5M2": (np.uint8, 0x7C),
              "F8_E4M3": (np.uint8, 0x7F), "F8_E8M0": (np.uint8, 0xFF)}
_CHUNK = 1 << 22  # elements checked at once (bounded host memory for a large embedding)


def _first_nonfinite(buf: np.ndarray, dtype: str, scale: bool) -> int | None:
    """Flat index of the first NaN / Inf in the stored bytes `buf` (`scale`: U8 bytes are UE8M0), or None."""
    spec = _NONFINITE.get("F8_E8M0" if scale and dtype == "U8" else dtype)
    if spec is None:
        return None
    uint, mask = spec[0], spec[0](spec[1])
    words = buf.view(uint)
    for i in range(0, words.size, _CHUNK):
        bad = np.flatnonzero((words[i:i + _CHUNK] & mask) == mask)
        if bad.size:
            return i + int(bad[0])
    return None


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
        leaf = f"{w[:-len('_scale')]}.scale" if w.endswith("_scale") else f"{w}.weight"  # native scales
        return [(f"{pre}{head}.{e}.{leaf}", idx + (e,)) for pre, idx in rows for e in range(n_experts)]
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
# Stored dtypes `decode_tensor` accepts, by a tensor's role; anything else is a CheckpointError (a
# scale read as values, or values read without their scale, would be 10^3-10^4x off). Native tensors
# (FP8 codes, packed FP4, scale bytes) are checked against `native.stored_dtypes` by `native_tensor`.
_QUANTISED = {"F8_E4M3", "I8"}  # a `.weight` with a `.scale` companion: FP8 codes or packed FP4
_SCALES = {"F8_E8M0", "U8"}  # UE8M0 scale bytes
_FLOATS = {"F32", "BF16", "F16", "F64"}  # every other tensor but the integer tables
_INTEGERS = {"I64", "I32", "I16", "I8", "U8"}
_INTEGER_TABLES = re.compile(r"(^|\.)tid2eid$")


def expected_dtypes(name: str, quantised: bool) -> tuple[set, str]:
    """(stored dtypes accepted, what they are) for canonical tensor `name` (`quantised`: it is a
    `.weight` with a `.scale` companion, or that `.scale`)."""
    if name.endswith(".scale"):
        return _SCALES, "UE8M0 scales"
    if quantised:
        return _QUANTISED, "a weight with a '.scale' (FP8 e4m3 codes or packed FP4)"
    if _INTEGER_TABLES.search(name):
        return _INTEGERS, "an integer table"
    return _FLOATS, "an unquantised float tensor"


def _check_dtype(st: SafetensorsDir, name: str, quantised: bool):
    raw_name = st.names[name]
    got, file = st.dtype(raw_name), st.entries[raw_name][0]
    want, what = expected_dtypes(name, quantised)
    if got == "F8_E4M3" and not quantised:
        raise CheckpointError(f"{file}: tensor '{name}' is FP8 but has no '.scale' companion")
    if got not in want:
        raise CheckpointError(f"{file}: tensor '{name}' is stored as {got}; {what} must be "
                              f"{' or '.join(sorted(want))}")


def decode_tensor(st: SafetensorsDir, name: str, want_shape: tuple) -> np.ndarray:
    """Tensor `name` of `want_shape`: FP8 / FP4 (plus its `.scale`) dequantised to float32, any other
    tensor as stored (a read-only memory map: the caller converts the slices it places). Its stored
    dtype must be one `expected_dtypes` allows."""
    raw_name = st.names[name]
    dt, shape = st.dtype(raw_name), st.shape(raw_name)
    scale_name = st.names.get(name[: -len(".weight")] + ".scale") if name.endswith(".weight") else None
    _check_dtype(st, name, quantised=scale_name is not None)
    if scale_name is not None:
        _check_dtype(st, name[: -len(".weight")] + ".scale", quantised=True)
    if dt == "F8_E4M3":
        _check_shape(name, shape, want_shape)
        want_scale = tuple(-(-s // 128) for s in want_shape)
        _check_shape(name[:-7] + ".scale", st.shape(scale_name), want_scale)
        return quant.dequant_fp8_weight(st.read(raw_name), st.read(scale_name))
    if dt == "I8" and scale_name is not None:  # packed FP4, [N, K/2] + scale [N, K/32]
        _check_shape(name, (*shape[:-1], shape[-1] * 2) if shape else shape, want_shape)
        _check_shape(name[:-7] + ".scale", st.shape(scale_name), (want_shape[0], -(-want_shape[1] // 32)))
        return quant.dequant_fp4_weight(st.read(raw_name), st.read(scale_name))
    _check_shape(name, shape, want_shape)
    # unquantised: the memory-mapped tensor itself; each device shard converts only its slice (a BF16
    # embedding is never widened to float32 on the host)
    return st.read(raw_name)


def native_tensor(st: SafetensorsDir, name: str, want_shape: tuple, fmt: str, dtype) -> np.ndarray:
    """Tensor `name` as stored (FP8 codes, packed FP4 bytes or UE8M0 scale bytes), reinterpreted as the
    device `dtype` without conversion; a stored dtype the format does not allow is a CheckpointError."""
    raw_name = st.names[name]
    codes, scales = native.stored_dtypes(fmt)
    allowed = scales if name.endswith(".scale") else codes
    got = st.dtype(raw_name)
    if got not in allowed:
        hint = "" if name.endswith(".scale") else " (load with --weights bf16 to convert other dtypes at load)"
        raise CheckpointError(f"tensor '{name}' is stored as {got}; native {fmt} weights need "
                              f"{' or '.join(sorted(allowed))}{hint}")
    _check_shape(name, st.shape(raw_name), want_shape)
    return native.host_bytes(st.read(raw_name), dtype)


def _check_shape(name, got, want):
    if tuple(got) != tuple(want):
        raise CheckpointError(f"tensor '{name}' has shape {list(got)}, the config expects {list(want)}")


# -------------------------------------------------------------------- loading a model
_IGNORABLE = re.compile(r"^mtp\.\d+\.(emb\w*|embed)\.weight$|^mtp\.\d+\.head\.weight$")


def load_hub(path: str, cfg: ModelConfig | None = None, mesh=None, progress: bool = True,
             **runtime) -> Transformer:
    """Model with the weights of a hub-format directory, sharded on `mesh` (default: one device).

    Quantised tensors stay in their stored formats (`native_weights`, the default when `cfg` is
    read here); `native_weights=False` dequantises them to `param_dtype` while loading. `progress`:
    a tqdm bar of tensors and bytes read (shown once loading takes more than 2 s)."""
    if cfg is None:
        cfg = ModelConfig.from_hub(path, **{"native_weights": True, **runtime})
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
    total = sum(_stored_bytes(st, name, with_scale=True) for name in table if not name.endswith(".scale"))
    with tqdm.tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {os.path.basename(path)}",
                   delay=2.0, disable=not progress, mininterval=1.0 if sys.stderr.isatty() else 30.0) as bar:
        new = nnx.from_flat_state([
            (p, v.replace(_build_array(st, by_path[p], v, flat_sh[p].get_value(), bar)))
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


def _stored_bytes(st: SafetensorsDir, name: str, with_scale: bool) -> int:
    """Bytes of tensor `name` in the files (plus its `.scale` companion's with `with_scale`)."""
    names = [name]
    if with_scale and name.endswith(".weight"):
        names.append(name[: -len(".weight")] + ".scale")
    return sum(st.entries[st.names[n]][4] - st.entries[st.names[n]][3] for n in names if n in st.names)


def _build_array(st: SafetensorsDir, names, var, sharding, bar=None) -> jax.Array:
    """One model array from its checkpoint tensors: `names` [(name, index into the leading stacked
    dims)]; each device shard reads only the tensors (layers, experts) and the slice it holds."""
    shape, dtype = tuple(var.shape), var.dtype
    lead = len(names[0][1])
    by_index = {idx: name for name, idx in names}
    fmt = var.get_metadata().get("fmt")
    cache: dict[str, np.ndarray] = {}
    seen: set[str] = set()

    def tensor(name):
        if name not in cache:
            cache.clear()  # keep at most one decoded tensor in host memory
            if fmt:
                cache[name] = native_tensor(st, name, shape[lead:], fmt, dtype)
            else:
                cache[name] = decode_tensor(st, name, shape[lead:])
            if bar is not None and name not in seen:
                seen.add(name)
                bar.update(_stored_bytes(st, name, with_scale=not fmt))
        return cache[name]

    def callback(index):  # always a fresh host array: no device buffer may alias the read-only file map
        if not lead:
            return np.array(tensor(names[0][0])[index], dtype=dtype)
        ranges = [range(*index[k].indices(shape[k])) for k in range(lead)]
        out = None
        for j, idx in enumerate(itertools.product(*ranges)):  # one shard's worth, filled tensor by tensor
            part = tensor(by_index[idx])[index[lead:]]
            if out is None:
                out = np.empty((math.prod(len(r) for r in ranges),) + part.shape, dtype)
            out[j] = part
        return out.reshape(tuple(len(r) for r in ranges) + out.shape[1:])

    return jax.make_array_from_callback(shape, sharding, callback)
