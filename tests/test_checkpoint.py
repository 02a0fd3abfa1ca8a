"""Hub checkpoint loading: name variants, sharded index files, and clear errors."""
import json
import os
import shutil
import struct

import numpy as np
import pytest

from conftest import fixture_dir
from v4jax import checkpoint, scoring
from v4jax.checkpoint import CheckpointError


def _header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


def _rewrite(src_dir, dst_dir, rename=None, drop=(), reshape=None, shards=1):
    """Re-writes a fixture's safetensors with renamed / dropped / re-declared tensors, optionally sharded."""
    os.makedirs(dst_dir, exist_ok=True)
    shutil.copy(os.path.join(src_dir, "config.json"), dst_dir)
    header, base = _header(os.path.join(src_dir, "model.safetensors"))
    blob = open(os.path.join(src_dir, "model.safetensors"), "rb").read()
    names = [n for n in header if n != "__metadata__" and n not in drop]
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        fn = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        out_h, chunks, off = {}, [], 0
        for n in group:
            meta = dict(header[n])
            b, e = meta["data_offsets"]
            data = blob[base + b: base + e]
            new = rename(n) if rename else n
            if reshape and n in reshape:
                meta["shape"] = reshape[n]
            meta["data_offsets"] = [off, off + len(data)]
            out_h[new] = meta
            chunks.append(data)
            off += len(data)
            weight_map[new] = fn
        hb = json.dumps(out_h).encode()
        with open(os.path.join(dst_dir, fn), "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb + b"".join(chunks))
    if shards > 1:
        with open(os.path.join(dst_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return dst_dir


def _variant_name(n):
    n = "model." + n.replace(".attn.", ".self_attn.").replace(".ffn.", ".mlp.")
    n = n.replace(".gate.bias", ".gate.e_score_correction_bias")
    return n[: -len(".scale")] + ".weight_scale_inv" if n.endswith(".scale") else n


def _params(model):
    from flax import nnx
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}


def test_name_variants_and_sharded_index(tmp_path, loaded):
    d = _rewrite(fixture_dir("tiny-a-fp8"), str(tmp_path / "v"), rename=_variant_name, shards=3)
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    got, ref = _params(checkpoint.load_hub(d)), _params(loaded["tiny-a-fp8"])
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])


def test_missing_tensor(tmp_path):
    d = _rewrite(fixture_dir("tiny-a-bf16"), str(tmp_path / "m"), drop=("layers.2.attn.wkv.weight",))
    with pytest.raises(CheckpointError, match="missing tensor 'layers.2.attn.wkv.weight'"):
        checkpoint.load_hub(d)


def test_unknown_tensor(tmp_path):
    d = _rewrite(fixture_dir("tiny-a-bf16"), str(tmp_path / "u"),
                 rename=lambda n: "layers.9.attn.wkv.weight" if n == "layers.2.attn.wkv.weight" else n)
    with pytest.raises(CheckpointError, match="unknown tensor 'layers.9.attn.wkv.weight'"):
        checkpoint.load_hub(d)


def test_wrong_shape(tmp_path):
    d = _rewrite(fixture_dir("tiny-a-bf16"), str(tmp_path / "s"), reshape={"layers.1.attn.wq_a.weight": [64, 256]})
    with pytest.raises(CheckpointError, match=r"'layers.1.attn.wq_a.weight' has shape \[64, 256\]"):
        checkpoint.load_hub(d)


def test_config_mismatch_is_refused(tmp_path):
    d = tmp_path / "c"
    shutil.copytree(fixture_dir("tiny-a-bf16"), d)
    raw = json.load(open(d / "config.json"))
    raw["num_hidden_layers"] = 3
    raw["compress_ratios"] = [0, 4, 16, 0]
    json.dump(raw, open(d / "config.json", "w"))
    with pytest.raises(CheckpointError, match="unknown tensor 'layers.3"):
        checkpoint.load_hub(str(d))


def test_truncated_file(tmp_path):
    d = tmp_path / "t"
    shutil.copytree(fixture_dir("tiny-a-bf16"), d)
    p = d / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="past the end of the file"):
        checkpoint.load_hub(str(d))


def test_token_out_of_range(loaded):
    with pytest.raises(ValueError, match="token id 1024 is out of range"):
        scoring.score(loaded["tiny-a-bf16"], np.array([[1, 2, 1024]]))
