"""Writing a model as a hub-format directory (config.json + sharded *.safetensors), the inverse of
`checkpoint.load_hub`.

  python -m v4jax.export --checkpoint RUN_DIR_OR_HUB_DIR --out HUB_DIR [--format bf16|fp8|fp4-experts]
                         [--shard-size 5GB] [--tokenizer PATH] [--force] [--mesh data=2,...] [--no-progress]

Formats (what the directory holds; DeepSeek's tensor names and dtypes in every case):
* "bf16": every projection in BF16; no `quantization_config`.
* "fp8": the projections the release stores in FP8 (and the routed experts) as F8_E4M3 codes [out, in]
  + F8_E8M0 `.scale` [ceil(out/128), ceil(in/128)]; `quantization_config` {fp8, e4m3, ue8m0, [128, 128]}.
* "fp4-experts" (the release's format): as "fp8", but the routed experts as packed e2m1 nibbles, I8
  [out, in/2] (low nibble = even column) + F8_E8M0 `.scale` [out, ceil(in/32)], `expert_dtype` "fp4".
In all three, the mHC tensors (`hc_*`), attention sinks, compressor `ape` and the router's balancing
`bias` are F32, the hash-routing table `tid2eid` I64, everything else BF16.

Which tensors are quantised is what the native skeleton of the exported config says
(`model.abstract(cfg.with_runtime(native_weights=True))`: variables whose metadata has `fmt`). A tensor
the source already holds in the target format (a natively loaded checkpoint) is copied as stored, byte
for byte; any other is quantised with the bit-exact QAT quantisers (`quant.fp8_weight_fake`,
`quant.fp4_weight_fake`), i.e. the exported weights are exactly what FP8 / FP4 QAT trains against.

The export streams: tensors are produced one at a time (a slice of one model array, quantised or cast on
its device, then copied to the host and written), so host memory holds one tensor, never the model.
Within a shard tensors are laid out as the safetensors library lays them out (by dtype, widest first,
then by name), so every tensor is aligned to its element size. Everything is written into a temporary
sibling directory that is renamed onto `--out` at the end, after every name, dtype and shape written has
been checked against the loader's table (`checkpoint.expected_tensors`) of the exported config.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import tqdm
from flax import nnx

from . import native, quant
from .checkpoint import CheckpointError, SafetensorsDir, expected_tensors
from .config import ConfigError, ModelConfig
from .model import abstract

FORMATS = ("bf16", "fp8", "fp4-experts")
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
# hub keys of the release's config.json that describe nothing v4jax computes (written for other readers)
RELEASE_KEYS = {"attention_bias": False, "attention_dropout": 0.0, "topk_method": "noaux_tc",
                "torch_dtype": "bfloat16", "use_cache": True}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
DEFAULT_SHARD_BYTES = 5 * 10 ** 9

_NP = {"BF16": ml_dtypes.bfloat16, "F32": np.float32, "I64": np.int64, "F8_E4M3": ml_dtypes.float8_e4m3fn,
       "F8_E8M0": np.uint8, "I8": np.int8}
# the order of dtypes inside a file (the safetensors library's: widest first, so every tensor is aligned)
_DTYPE_ORDER = {"I64": 0, "F32": 1, "BF16": 2, "F8_E8M0": 3, "F8_E4M3": 4, "I8": 5}
_F32_NAMES = re.compile(r"(^|\.)hc_(attn|ffn|head)_(fn|base|scale)$|\.attn_sink$|\.ape$|\.gate\.bias$")


class ExportError(ValueError):
    """An export that cannot be done as asked (bad format, existing --out, a tensor that does not fit)."""


# -------------------------------------------------------------------- config
def target_config(cfg: ModelConfig, fmt: str) -> ModelConfig:
    """`cfg` with the checkpoint format of `fmt`, native weights on (its skeleton says what is quantised)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}' (one of {', '.join(FORMATS)})")
    return dataclasses.replace(cfg, weight_format="bf16" if fmt == "bf16" else "fp8",
                               expert_dtype="fp4" if fmt == "fp4-experts" else None, native_weights=True)


def hub_config(cfg: ModelConfig, fmt: str) -> dict:
    """The config.json dict of an export in `fmt` (DeepSeek's schema; `ModelConfig.from_hub` reads it back)."""
    tcfg = target_config(cfg, fmt)
    d = {**RELEASE_KEYS, **tcfg.to_hub(), "expert_dtype": tcfg.expert_dtype}
    if fmt != "bf16":
        d["quantization_config"] = dict(QUANTIZATION_CONFIG)
    return d


def parse_size(text) -> int:
    """"5GB" -> 5e9 bytes, "500MiB" -> 500 * 2^20, "123" -> 123 (decimal units as Hugging Face's)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise ExportError(f"--shard-size '{text}': expected a size such as 5GB, 500MB, 2GiB or a byte count")
    unit = m.group(2).upper().rstrip("B")
    scale = {"": 1, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12,
             "KI": 2 ** 10, "MI": 2 ** 20, "GI": 2 ** 30, "TI": 2 ** 40}[unit]
    size = int(float(m.group(1)) * scale)
    if size < 1:
        raise ExportError(f"--shard-size '{text}' must be at least one byte")
    return size


# -------------------------------------------------------------------- the plan: what goes where
@dataclasses.dataclass(frozen=True)
class Planned:
    """One tensor of the export: checkpoint `name`, safetensors `dtype`, `shape` as stored (packed FP4
    codes [out, in/2]), and `fmt` ("fp8" / "fp4" for codes and scales, None for a plain tensor)."""
    name: str
    dtype: str
    shape: tuple
    fmt: str | None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(_NP[self.dtype]).itemsize


def stored_dtype(name: str, fmt: str | None, integer: bool) -> str:
    """Safetensors dtype of tensor `name` in the release's conventions."""
    if fmt:
        return "F8_E8M0" if name.endswith(".scale") else ("F8_E4M3" if fmt == "fp8" else "I8")
    if integer:
        return "I64"
    return "F32" if _F32_NAMES.search(name) else "BF16"


def plan_tensors(cfg: ModelConfig, fmt: str) -> list[Planned]:
    """Every tensor of an export of a `cfg` model in `fmt`, in natural name order (layer by layer)."""
    try:
        skeleton = abstract(target_config(cfg, fmt))
    except ValueError as e:  # e.g. an odd input dim cannot hold FP4 nibble pairs
        raise ExportError(f"a {fmt} export of this model is impossible: {e}") from None
    flat = dict(nnx.to_flat_state(nnx.state(skeleton)))
    out = []
    for name, (path, _, shape) in expected_tensors(skeleton).items():
        var = flat[path]
        tfmt = var.get_metadata().get("fmt")
        out.append(Planned(name, stored_dtype(name, tfmt, jnp.issubdtype(var.dtype, jnp.integer)), tuple(shape), tfmt))
    return sorted(out, key=lambda p: _natural(p.name))


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _group(name: str) -> str:
    return re.sub(r"\.(weight|scale)$", "", name)


def shard_plan(planned: list[Planned], shard_bytes: int) -> list[list[Planned]]:
    """Consecutive tensors into shards of at most `shard_bytes` (a weight and its `.scale` stay together;
    a tensor larger than the limit gets a shard of its own); each shard in its file order."""
    groups: dict[str, list[Planned]] = {}
    for p in planned:
        groups.setdefault(_group(p.name), []).append(p)
    shards, size = [[]], 0
    for members in groups.values():
        n = sum(p.nbytes for p in members)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(members)
        size += n
    return [sorted(s, key=lambda p: (_DTYPE_ORDER[p.dtype], p.name)) for s in shards]


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


# -------------------------------------------------------------------- producing one tensor
@jax.jit
def _take(a, idx):
    """a[idx[0], idx[1], ...] with traced indices (one compiled slice per array shape, not per index)."""
    return a[tuple(idx[k] for k in range(idx.shape[0]))]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _dequant(fmt, codes, scale, dtype):
    return native.dequant(fmt, codes, scale, dtype)


@functools.partial(jax.jit, static_argnums=(1,))
def _quantise(w, fmt):
    """w [out, in] -> (codes, float32 power-of-two scales); fp4 codes as e4m3 (every e2m1 value is one)."""
    w = w.astype(jnp.float32)
    if fmt == "fp8":
        _, q, s = quant.fp8_weight_fake(w, return_scale=True)
        return q, s
    _, q, s = quant.fp4_weight_fake(w, return_scale=True)
    return q.astype(jnp.float32).astype(jnp.float8_e4m3fn), s


@functools.partial(jax.jit, static_argnums=(1,))
def _cast(a, dtype):
    return a.astype(dtype)


class Source:
    """The tensors of a model under their checkpoint names, one at a time, on the model's devices."""

    def __init__(self, model):
        self.flat = dict(nnx.to_flat_state(nnx.state(model)))
        self.table = expected_tensors(model)

    def fmt(self, name: str) -> str | None:
        return self.flat[self._entry(name)[0]].get_metadata().get("fmt")

    def raw(self, name: str) -> jax.Array:
        """Tensor `name` as the model holds it (native codes / scale bytes as stored)."""
        path, idx, _ = self._entry(name)
        a = self.flat[path].get_value()
        return _take(a, jnp.asarray(idx, jnp.int32)) if idx else jnp.asarray(a)

    def value(self, name: str) -> jax.Array:
        """Tensor `name`'s values: float32 (native codes dequantised, exactly) or integers."""
        fmt = self.fmt(name)
        if fmt:
            return _dequant(fmt, self.raw(name), self.raw(_group(name) + ".scale"), jnp.float32)
        a = self.raw(name)
        return a if jnp.issubdtype(a.dtype, jnp.integer) else _cast(a, jnp.float32)

    def _entry(self, name: str):
        if name not in self.table:
            raise ExportError(f"tensor '{name}' of the export has no counterpart in the model")
        return self.table[name]


def produce(src: Source, p: Planned) -> np.ndarray:
    """Host array of tensor `p` exactly as it is stored (dtype _NP[p.dtype], shape p.shape)."""
    if p.fmt:
        base, is_scale = _group(p.name) + ".weight", p.name.endswith(".scale")
        if src.fmt(base) == p.fmt:  # already in the target format: copied as stored
            return np.asarray(src.raw(p.name)).view(_NP[p.dtype])
        q, s = _quantise(src.value(base), p.fmt)
        if is_scale:
            return quant.e8m0_bytes(np.asarray(s))
        q = np.asarray(q)
        return q if p.fmt == "fp8" else quant.pack_fp4(q.astype(np.float32))
    a = src.value(p.name)
    if p.dtype == "I64":
        return np.asarray(a).astype(np.int64)
    return np.asarray(_cast(a, jnp.bfloat16 if p.dtype == "BF16" else jnp.float32))


# -------------------------------------------------------------------- writing files
def _write_shard(path: str, entries: list[Planned], make, bar=None) -> None:
    """One safetensors file: 8-byte little-endian header length, compact JSON header padded with spaces
    to a multiple of 8, then the tensors' bytes in `entries` order (contiguous, no gaps)."""
    header, off = {}, 0
    for p in entries:
        header[p.name] = {"dtype": p.dtype, "shape": list(p.shape), "data_offsets": [off, off + p.nbytes]}
        off += p.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for p in entries:
            arr = np.ascontiguousarray(make(p))
            if tuple(arr.shape) != p.shape or arr.dtype != np.dtype(_NP[p.dtype]):
                raise ExportError(f"tensor '{p.name}': produced {arr.dtype} {list(arr.shape)}, the export needs "
                                  f"{p.dtype} {list(p.shape)} (file {os.path.basename(path)})")
            f.write(arr.reshape(-1).view(np.uint8).data)
            if bar is not None:
                bar.update(p.nbytes)
        f.flush()
        os.fsync(f.fileno())


def _verify(tmp: str, shards: list[list[Planned]]) -> None:
    """The written directory against the loader's table of its own config.json: every name, shape, dtype."""
    cfg = ModelConfig.from_hub(tmp, native_weights=True)
    table = expected_tensors(abstract(cfg))
    st = SafetensorsDir(tmp)
    with open(os.path.join(tmp, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    missing = sorted(set(table) - set(st.entries))
    unknown = sorted(set(st.entries) - set(table))
    if missing or unknown:
        raise ExportError(f"written tensors do not match the exported config: missing {missing[:3]}, "
                          f"unknown {unknown[:3]}")
    want = {p.name: (p.dtype, fn) for i, s in enumerate(shards) for p in s for fn in [shard_name(i, len(shards))]}
    for name, (_, _, shape) in table.items():
        file, dtype, got, _, _ = st.entries[name]
        where = os.path.basename(file)
        if tuple(got) != tuple(shape):
            raise ExportError(f"tensor '{name}' in {where}: shape {list(got)}, the loader expects {list(shape)}")
        if (dtype, where) != want[name] or weight_map.get(name) != where:
            raise ExportError(f"tensor '{name}': written as {dtype} in {where} (index: {weight_map.get(name)}), "
                              f"planned {want[name][0]} in {want[name][1]}")


def _tokenizer_files(spec) -> list[tuple[str, str]]:
    """(source path, name in the export) for a tokenizer spec: a directory (its known tokenizer files),
    a file (copied under its own name), or a list of those."""
    items = [] if spec is None else [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out = {}
    for item in items:
        item = os.fspath(item)
        if os.path.isdir(item):
            for fn in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(item, fn)):
                    out.setdefault(fn, os.path.join(item, fn))
        elif os.path.isfile(item):
            out[os.path.basename(item)] = item
        else:
            raise ExportError(f"tokenizer '{item}' does not exist")
    return [(src, name) for name, src in out.items()]


def check_out(out_dir: str, force: bool) -> None:
    """Refuses an --out that exists and is not an empty directory, unless `force`."""
    if not os.path.lexists(out_dir) or force:
        return
    if not os.path.isdir(out_dir):
        raise ExportError(f"--out {out_dir} exists and is not a directory (pass --force to replace it)")
    if os.listdir(out_dir):
        raise ExportError(f"--out {out_dir} exists and is not empty (pass --force to replace it)")


def _move_into_place(tmp: str, out_dir: str, force: bool) -> None:
    check_out(out_dir, force)
    if os.path.isdir(out_dir) and not os.path.islink(out_dir) and not os.listdir(out_dir):
        os.rmdir(out_dir)
    if not os.path.lexists(out_dir):
        os.rename(tmp, out_dir)
        return
    old = tmp + ".old"  # --force: the previous --out goes aside until the new one is in place
    os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old)
    else:
        os.remove(old)


# -------------------------------------------------------------------- the export
def export(model, out_dir: str, fmt: str = "bf16", tokenizer=None, shard_bytes: int = DEFAULT_SHARD_BYTES,
           force: bool = False, progress: bool = True) -> dict:
    """Writes `model` as a hub directory `out_dir` in `fmt` ("bf16" | "fp8" | "fp4-experts").

    `tokenizer`: a directory (its tokenizer files are copied), a file, a list of those, or None.
    `shard_bytes`: the most tensor bytes per file. Atomic: nothing appears at `out_dir` unless the whole
    export succeeded; an existing non-empty `out_dir` is refused unless `force`.
    Returns {"out", "format", "files", "tensors", "bytes", "tokenizer"}."""
    if jax.process_count() > 1:
        raise ExportError("export runs in one process (every array is read whole on this host); "
                          f"this is process {jax.process_index()} of {jax.process_count()}")
    check_out(out_dir, force)
    if int(shard_bytes) < 1:
        raise ExportError(f"shard size must be positive, got {shard_bytes}")
    planned = plan_tensors(model.cfg, fmt)
    shards = shard_plan(planned, int(shard_bytes))
    tok = _tokenizer_files(tokenizer)
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.export-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would become --out's mode
    total = sum(p.nbytes for p in planned)
    try:
        src = Source(model)
        with tqdm.tqdm(total=total, unit="B", unit_scale=True, desc=f"exporting {os.path.basename(out_dir)}",
                       disable=not progress, delay=2.0, mininterval=1.0 if sys.stderr.isatty() else 30.0) as bar:
            for i, entries in enumerate(shards):
                _write_shard(os.path.join(tmp, shard_name(i, len(shards))), entries,
                             functools.partial(produce, src), bar)
        weight_map = {p.name: shard_name(i, len(shards)) for i, s in enumerate(shards) for p in s}
        _write_json(os.path.join(tmp, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        _write_json(os.path.join(tmp, "config.json"), hub_config(model.cfg, fmt))
        for path, name in tok:
            shutil.copyfile(path, os.path.join(tmp, name))
        _verify(tmp, shards)
        _move_into_place(tmp, out_dir, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": out_dir, "format": fmt, "files": [shard_name(i, len(shards)) for i in range(len(shards))],
            "tensors": len(planned), "bytes": total, "tokenizer": sorted(name for _, name in tok)}


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


# -------------------------------------------------------------------- sources and the command line
def load_source(path: str, mesh=None, progress: bool = True):
    """(model, tokenizer spec) of a hub directory (loaded natively: FP8/FP4 tensors stay as stored) or a
    train.py run directory (its fp32 master weights; the tokenizer its run recorded, if any)."""
    from .checkpoint import load_hub
    from .trainer import load_trained

    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint directory {path}")
    if any(f.endswith(".safetensors") for f in os.listdir(path)):
        return load_hub(path, mesh=mesh, progress=progress), [path]
    model = load_trained(path)
    spec = [path]
    recorded = _run_tokenizer(path)
    if recorded:
        spec = [path, os.path.dirname(recorded), recorded] if os.path.basename(recorded) == "tokenizer.json" \
            else [path, recorded]
    return model, spec


def _run_tokenizer(run_dir: str) -> str | None:
    """The tokenizer file a training run recorded in its latest checkpoint (None: byte tokenizer)."""
    import orbax.checkpoint as ocp

    try:
        mgr = ocp.CheckpointManager(os.path.abspath(run_dir))
        meta = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception:  # noqa: BLE001 - no readable record: nothing to copy
        return None
    tok = (meta or {}).get("run", {}).get("tokenizer")
    if tok and not os.path.isfile(tok):
        print(f"warning: the run's tokenizer {tok} no longer exists; not copied", file=sys.stderr)
        return None
    return tok


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m v4jax.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a train.py --out directory or a hub-format directory")
    p.add_argument("--out", required=True, help="the hub directory to write (must not exist, or be empty)")
    p.add_argument("--format", choices=FORMATS, default="bf16",
                   help="bf16 (default); fp8: FP8 projections and experts; fp4-experts: the release's format")
    p.add_argument("--shard-size", default="5GB", help="most tensor bytes per file, e.g. 5GB, 500MB, 2GiB")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer file or directory (default: the checkpoint's, or the one its run recorded)")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--mesh", default=None, help="load a hub checkpoint sharded, e.g. expert=8 (default: one device)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        shard_bytes = parse_size(args.shard_size)
        check_out(args.out, args.force)  # before the (long) load
        mesh = None
        if args.mesh:
            from .sharding import make_mesh
            mesh = make_mesh(args.mesh)
        model, tok = load_source(args.checkpoint, mesh, progress=not args.no_progress)
        res = export(model, args.out, args.format, tokenizer=args.tokenizer or tok, shard_bytes=shard_bytes,
                     force=args.force, progress=not args.no_progress)
    except (ExportError, CheckpointError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    extra = f" + {', '.join(res['tokenizer'])}" if res["tokenizer"] else ""
    print(f"wrote {res['out']}: {res['format']}, {res['tensors']} tensors, {res['bytes'] / 1e6:.1f} MB in "
          f"{len(res['files'])} file(s){extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
