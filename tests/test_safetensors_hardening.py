"""Damaged or hostile checkpoints are refused with a CheckpointError naming the file and the tensor.

Safetensors headers (offsets, shapes, dtypes, overlaps, duplicates), the index file (shards outside the
directory, a missing weight_map), stored dtypes the loader does not expect for a tensor's role, and
NaN / Inf values in weights and scales (issue 13 items 1-3, issue 14)."""
import json
import os
import re
import shutil
import struct

import numpy as np
import pytest

from conftest import fixture_dir
from v4jax import checkpoint
from v4jax.checkpoint import CheckpointError

FP8, BF16 = "tiny-a-fp8", "tiny-a-bf16"


# ------------------------------------------------------------------ helpers: crafting files
def _write(path, header, blob=b"", length=None):
    """A safetensors file: `header` (an object, or raw bytes) + `blob`; `length` overrides the length field."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb) if length is None else length) + hb + blob)
    return str(path)


def _pair(a_offsets=(0, 8), b_offsets=(8, 16), **b_meta):
    """Header of two F32 [2] tensors 'a' and 'b' (b's entry overridable) and a 16-byte buffer."""
    b = {"dtype": "F32", "shape": [2], "data_offsets": list(b_offsets), **b_meta}
    return {"a": {"dtype": "F32", "shape": [2], "data_offsets": list(a_offsets)}, "b": b}, bytes(16)


def _one_file_dir(tmp_path, header, blob=b"", length=None):
    d = tmp_path / "st"
    d.mkdir()
    return str(d), _write(d / "model.safetensors", header, blob, length)


def _refused(path, *patterns):
    with pytest.raises(CheckpointError) as e:
        checkpoint.SafetensorsDir(path)
    for p in patterns:
        assert re.search(p, str(e.value)), (p, str(e.value))
    return str(e.value)


def _header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


def _restore(variant, dst, changes):
    """Copy of a fixture with tensors re-stored: changes = {name: (dtype, shape or None, bytes)}."""
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(fixture_dir(variant), "config.json"), dst)
    src = os.path.join(fixture_dir(variant), "model.safetensors")
    header, base = _header(src)
    blob = open(src, "rb").read()[base:]
    out, chunks, off = {}, [], 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        b, e = meta["data_offsets"]
        dtype, shape, data = changes.get(name, (meta["dtype"], None, blob[b:e]))
        out[name] = {"dtype": dtype, "shape": shape or meta["shape"], "data_offsets": [off, off + len(data)]}
        chunks.append(data)
        off += len(data)
    _write(os.path.join(dst, "model.safetensors"), out, b"".join(chunks))
    return dst


def _poke(variant, dst, name, element, raw: bytes):
    """Copy of a fixture with the bytes of element `element` of tensor `name` replaced by `raw`."""
    shutil.copytree(fixture_dir(variant), dst)
    path = os.path.join(dst, "model.safetensors")
    header, base = _header(path)
    with open(path, "r+b") as f:
        f.seek(base + header[name]["data_offsets"][0] + element * len(raw))
        f.write(raw)
    return str(dst)


def _st(p):
    return re.escape(os.path.join(str(p), "model.safetensors"))


# ------------------------------------------------------------------ item 1: every header entry validated
@pytest.mark.parametrize("a,b", [((0, 8), (4, 12)), ((0, 8), (0, 8)), ((4, 12), (0, 8))])
def test_overlapping_tensors_are_refused(tmp_path, a, b):
    header, blob = _pair(a, b)
    d, f = _one_file_dir(tmp_path, header, blob)
    _refused(d, re.escape(f), r"tensors '(a|b)' and '(a|b)' overlap")


def test_aliased_tensor_in_a_fixture_is_refused(tmp_path):
    """norm.weight declared over the first bytes of embed.weight: it would load the embedding's values."""
    d = str(tmp_path / "alias")
    shutil.copytree(fixture_dir(BF16), d)
    path = os.path.join(d, "model.safetensors")
    header, base = _header(path)
    blob = open(path, "rb").read()[base:]
    b = header["embed.weight"]["data_offsets"][0]
    header["norm.weight"]["data_offsets"] = [b, b + 256]
    _write(path, header, blob)
    with pytest.raises(CheckpointError, match=_st(d) + r": tensors '.*' and '.*' overlap"):
        checkpoint.load_hub(d)


def test_negative_begin_is_refused(tmp_path):
    """A negative begin would read the JSON header's bytes as weights."""
    header, blob = _pair(b_offsets=(-8, 0), shape=[2])
    d, f = _one_file_dir(tmp_path, header, blob)
    _refused(d, re.escape(f) + r": tensor 'b': data_offsets \[-8, 0\] are not 0 <= begin <= end")


def test_begin_after_end_is_refused(tmp_path):
    header, blob = _pair(b_offsets=(16, 8))
    d, f = _one_file_dir(tmp_path, header, blob)
    _refused(d, re.escape(f) + r": tensor 'b': data_offsets \[16, 8\]")


@pytest.mark.parametrize("b_meta", [dict(data_offsets=[8, 12]), dict(dtype="BF16"), dict(shape=[3]),
                                    dict(shape=[2, 2]), dict(shape=[]), dict(dtype="F64")])
def test_byte_length_must_be_shape_times_itemsize(tmp_path, b_meta):
    header, blob = _pair(**b_meta)
    d, f = _one_file_dir(tmp_path, header, blob + bytes(16))
    _refused(d, re.escape(f) + r": tensor 'b': data_offsets span \d+ bytes, \w+ \[.*\] is \d+")


@pytest.mark.parametrize("shape", [[-1, -2], [-2], [2.0], "2", [True, 2], [[2]], None, {"0": 2}])
def test_shape_must_be_non_negative_integers(tmp_path, shape):
    header, blob = _pair(shape=shape)
    d, f = _one_file_dir(tmp_path, header, blob)
    _refused(d, re.escape(f) + r": tensor 'b': shape is not a list of non-negative integers")


@pytest.mark.parametrize("offsets", [[8], [8, 16, 24], ["8", "16"], [8.0, 16.0], None, [False, 8], 8])
def test_data_offsets_must_be_two_integers(tmp_path, offsets):
    header, blob = _pair()
    header["b"]["data_offsets"] = offsets
    d, f = _one_file_dir(tmp_path, header, blob)
    _refused(d, re.escape(f) + r": tensor 'b': data_offsets is not a pair of integers")


@pytest.mark.parametrize("drop", ["data_offsets", "dtype", "shape"])
def test_entry_missing_a_key_is_refused(tmp_path, drop):
    header, blob = _pair()
    del header["b"][drop]
    d, f = _one_file_dir(tmp_path, header, blob)
    _refused(d, re.escape(f) + r": tensor 'b': a header entry needs 'dtype', 'shape' and 'data_offsets'")


@pytest.mark.parametrize("entry", [5, "F32", [0, 8], None])
def test_entry_that_is_not_an_object_is_refused(tmp_path, entry):
    header, blob = _pair()
    header["b"] = entry
    d, f = _one_file_dir(tmp_path, header, blob)
    _refused(d, re.escape(f) + r": tensor 'b': a header entry needs")


@pytest.mark.parametrize("header", [b"[1, 2]", b'"text"', b"5", b"null", b'{"__metadata__": 5}'])
def test_header_that_is_not_a_json_object_is_refused(tmp_path, header):
    d, f = _one_file_dir(tmp_path, header)
    _refused(d, re.escape(f) + r": corrupt safetensors header \(")


def test_unknown_dtype_names_the_file_and_tensor(tmp_path):
    header, blob = _pair(dtype="F8_E3M4")
    d, f = _one_file_dir(tmp_path, header, blob)
    _refused(d, re.escape(f) + r": tensor 'b': unsupported dtype 'F8_E3M4'")


def test_header_length_larger_than_the_file_is_not_echoed(tmp_path):
    length = 1234567890123
    d, f = _one_file_dir(tmp_path, b"{}", length=length)
    msg = _refused(d, re.escape(f) + r": not a safetensors file \(header length field larger than the file")
    assert str(length) not in msg


def test_header_bytes_are_not_echoed(tmp_path):
    d, f = _one_file_dir(tmp_path, b"\xff\xfe\xfdsecret")
    msg = _refused(d, re.escape(f) + r": corrupt safetensors header \(not UTF-8 JSON\)")
    assert "0xff" not in msg and "secret" not in msg


def test_a_tensor_twice_in_one_header_is_refused(tmp_path):
    """json.loads keeps the last of two equal keys: the first entry would silently vanish."""
    raw = (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
           b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}')
    d, f = _one_file_dir(tmp_path, raw, bytes(16))
    _refused(d, re.escape(f) + r": key 'a' appears twice in the safetensors header")


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    header, blob = _pair()
    d = tmp_path / "two"
    d.mkdir()
    _write(d / "model-00001-of-00002.safetensors", header, blob)
    _write(d / "model-00002-of-00002.safetensors", {"a": header["a"]}, blob[:8])
    _refused(str(d), r"tensor 'a' is in two shards: .*model-00001-of-00002.safetensors and "
             r".*model-00002-of-00002.safetensors")


def test_two_names_of_one_tensor_are_refused(tmp_path):
    """'model.norm.weight' and 'norm.weight' are one tensor for the loader (the last would win)."""
    header, blob = _pair()
    d = tmp_path / "variants"
    d.mkdir()
    _write(d / "a.safetensors", {"model.norm.weight": header["a"]}, blob[:8])
    _write(d / "b.safetensors", {"norm.weight": header["a"]}, blob[:8])
    _refused(str(d), r"tensors 'model.norm.weight' \(.*a.safetensors\) and 'norm.weight' \(.*b.safetensors\) "
             r"are both 'norm.weight'")


def test_index_entry_in_the_wrong_shard_is_refused(tmp_path):
    header, blob = _pair()
    d = tmp_path / "idx"
    d.mkdir()
    _write(d / "a.safetensors", {"a": header["a"]}, blob[:8])
    _write(d / "b.safetensors", {"b": dict(header["b"], data_offsets=[0, 8])}, blob[:8])
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "b.safetensors",
                                                                               "b": "b.safetensors"}}))
    _refused(str(d), r"model.safetensors.index.json: lists tensor 'a' in b.safetensors, which does not hold it")


# ------------------------------------------------------------------ item 2: expected stored dtypes
@pytest.mark.parametrize("dtype,itemsize", [("F16", 2), ("BF16", 2), ("F8_E5M2", 1), ("U8", 1), ("F32", 4)])
def test_weight_beside_a_scale_must_be_fp8_or_fp4_when_dequantising(tmp_path, dtype, itemsize):
    """native_weights=False: a '.weight' next to its '.scale' in another dtype would load without the scale."""
    name = "layers.1.attn.wq_a.weight"
    d = _restore(FP8, str(tmp_path / dtype), {name: (dtype, None, bytes(128 * 128 * itemsize))})
    with pytest.raises(CheckpointError, match=_st(d) + rf": tensor '{name}' is stored as {dtype}; a weight with "
                       r"a '.scale' \(FP8 e4m3 codes or packed FP4\) must be F8_E4M3 or I8"):
        checkpoint.load_hub(d, native_weights=False)


@pytest.mark.parametrize("dtype,itemsize", [("F32", 4), ("BF16", 2), ("I32", 4)])
def test_scale_must_be_ue8m0_bytes_when_dequantising(tmp_path, dtype, itemsize):
    name = "layers.1.attn.wq_a.scale"
    d = _restore(FP8, str(tmp_path / dtype), {name: (dtype, None, bytes(itemsize))})
    with pytest.raises(CheckpointError, match=_st(d) + rf": tensor '{name}' is stored as {dtype}; UE8M0 scales "
                       "must be F8_E8M0 or U8"):
        checkpoint.load_hub(d, native_weights=False)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("name,dtype,itemsize,what", [
    ("norm.weight", "I32", 4, "an unquantised float tensor"),
    ("norm.weight", "BOOL", 1, "an unquantised float tensor"),
    ("norm.weight", "F8_E5M2", 1, "an unquantised float tensor"),
    ("hc_head_fn", "I32", 4, "an unquantised float tensor"),
    ("layers.0.ffn.gate.tid2eid", "F32", 4, "an integer table"),
    ("layers.0.ffn.gate.tid2eid", "BF16", 2, "an integer table"),
])
def test_unquantised_tensor_in_an_unexpected_dtype_is_refused(tmp_path, native, name, dtype, itemsize, what):
    header, _ = _header(os.path.join(fixture_dir(FP8), "model.safetensors"))
    n = int(np.prod(header[name]["shape"]))
    d = _restore(FP8, str(tmp_path / "d"), {name: (dtype, None, bytes(n * itemsize))})
    with pytest.raises(CheckpointError, match=_st(d) + rf": tensor '{name}' is stored as {dtype}; {what} must be"):
        checkpoint.load_hub(d, native_weights=native)


# ------------------------------------------------------------------ item 3: NaN / Inf in weights and scales
@pytest.mark.parametrize("name,raw", [
    ("embed.weight", np.array([0x7FC0], np.uint16).tobytes()),  # BF16 NaN
    ("embed.weight", np.array([0xFF80], np.uint16).tobytes()),  # BF16 -Inf
    ("layers.2.attn.wq_a.weight", np.array([0x7F81], np.uint16).tobytes()),  # BF16 signalling NaN
    ("hc_head_fn", np.array([np.inf], np.float32).tobytes()),
    ("layers.2.ffn.gate.bias", np.array([np.nan], np.float32).tobytes()),
])
def test_nan_or_inf_in_a_float_tensor_is_refused(tmp_path, name, raw):
    d = _poke(BF16, tmp_path / "nan", name, 5, raw)
    with pytest.raises(CheckpointError, match=_st(d) + rf": tensor '{name}' holds a NaN or Inf \(\w+ element 5\)"):
        checkpoint.load_hub(d)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("code", [0x7F, 0xFF])
def test_nan_fp8_code_is_refused(tmp_path, native, code):
    name = "layers.1.attn.wq_a.weight"
    ok = _poke(FP8, tmp_path / "max", name, 3, bytes([0x7E, 0xFE]))  # +-448: finite, exponent all ones
    checkpoint.load_hub(ok, native_weights=native)
    d = _poke(FP8, tmp_path / "nan", name, 3, bytes([code]))
    with pytest.raises(CheckpointError, match=_st(d) + rf": tensor '{name}' holds a NaN or Inf \(F8_E4M3 element 3\)"):
        checkpoint.load_hub(d, native_weights=native)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("name,dtype", [("layers.1.attn.wq_a.scale", "F8_E8M0"),
                                        ("layers.0.ffn.experts.3.w1.scale", "F8_E8M0"),
                                        ("layers.0.ffn.experts.3.w1.scale", "U8")])
def test_nan_scale_byte_is_refused(tmp_path, native, name, dtype):
    """UE8M0 byte 0xFF is NaN, also when the scale is declared plain U8."""
    path = os.path.join(fixture_dir(FP8), "model.safetensors")
    header, base = _header(path)
    b, e = header[name]["data_offsets"]
    data = bytearray(open(path, "rb").read()[base + b: base + e])
    data[-1] = 0xFF
    d = _restore(FP8, str(tmp_path / "d"), {name: (dtype, None, bytes(data))})
    with pytest.raises(CheckpointError, match=_st(d) + rf": tensor '{name}' holds a NaN or Inf \({dtype} element "
                       rf"{len(data) - 1}\)"):
        checkpoint.load_hub(d, native_weights=native)


def test_finiteness_follows_each_dtypes_bit_patterns(tmp_path):
    """Finite extremes of every format read back; exactly the NaN / Inf patterns are refused."""
    finite = [("F8_E4M3", [0x7E, 0xFE, 0x80, 0x78]), ("F8_E8M0", [0xFE, 0x00]), ("BF16", [0x7F7F, 0xFF7F]),
              ("F16", [0x7BFF]), ("F8_E5M2", [0x7B, 0xFB]), ("U8", [0xFF]), ("I8", [0xFF]), ("I32", [-1])]
    bad = [("F8_E4M3", 0x7F), ("F8_E4M3", 0xFF), ("F8_E8M0", 0xFF), ("BF16", 0x7F80), ("F16", 0xFC00),
           ("F8_E5M2", 0x7E), ("F32", 0x7FC00000), ("F64", 0xFFF0000000000000)]
    store = {"F8_E4M3": np.uint8, "F8_E8M0": np.uint8, "BF16": np.uint16, "F16": np.uint16, "F8_E5M2": np.uint8,
             "U8": np.uint8, "I8": np.uint8, "I32": np.int32, "F32": np.uint32, "F64": np.uint64}
    for i, (dtype, values) in enumerate(finite + [(dt, [0, v]) for dt, v in bad]):
        raw = np.array(values, dtype=store[dtype]).tobytes()
        d = tmp_path / f"t{i}"
        d.mkdir()
        _write(d / "model.safetensors", {"t": {"dtype": dtype, "shape": [len(values)],
                                               "data_offsets": [0, len(raw)]}}, raw)
        st = checkpoint.SafetensorsDir(str(d))
        if i < len(finite):
            assert st.read("t").size == len(values)
        else:
            with pytest.raises(CheckpointError, match=rf"tensor 't' holds a NaN or Inf \({dtype} element 1\)"):
                st.read("t")


# ------------------------------------------------------------------ issue 14: the index file
def _indexed(tmp_path, target):
    """A checkpoint directory whose index maps every tensor of the bf16 fixture to shard name `target`."""
    d = tmp_path / "ckpt"
    d.mkdir(exist_ok=True)
    shutil.copy(os.path.join(fixture_dir(BF16), "config.json"), d)
    header, _ = _header(os.path.join(fixture_dir(BF16), "model.safetensors"))
    wm = {n: target for n in header if n != "__metadata__"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return str(d)


def test_index_shards_must_be_inside_the_directory(tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(fixture_dir(BF16), outside)
    d = _indexed(tmp_path, "model.safetensors")  # a symlinked shard (the hub cache's layout) is fine
    os.symlink(os.path.join("..", "outside", "model.safetensors"), os.path.join(d, "model.safetensors"))
    checkpoint.load_hub(d)
    for target in (str(outside / "model.safetensors"), "../outside/model.safetensors",
                   "sub/../../outside/model.safetensors", "..\\outside\\model.safetensors"):
        d = _indexed(tmp_path, target)
        with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: shard .* is not inside the "
                           r"checkpoint directory \(absolute paths and '..' are refused\)"):
            checkpoint.load_hub(d)


def test_index_pointing_at_a_non_safetensors_file_does_not_echo_it(tmp_path):
    d = _indexed(tmp_path, "config.json")
    first8 = struct.unpack("<Q", open(os.path.join(d, "config.json"), "rb").read(8))[0]
    with pytest.raises(CheckpointError, match=re.escape(os.path.join(d, "config.json")) +
                       r": not a safetensors file") as e:
        checkpoint.load_hub(d)
    assert str(first8) not in str(e.value)


@pytest.mark.parametrize("content", [b"not json {", b"\xff\xfe\x00garbage", b"[1, 2]", b'{"metadata": {}}',
                                     b'{"weight_map": ["model.safetensors"]}', b'{"weight_map": {"x": 5}}',
                                     b'{"weight_map": {"x": null}}'])
def test_bad_index_file_is_refused(tmp_path, content):
    d = tmp_path / "bad"
    shutil.copytree(fixture_dir(BF16), d)
    (d / "model.safetensors.index.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(str(d / "model.safetensors.index.json")) + ": "):
        checkpoint.load_hub(str(d))
