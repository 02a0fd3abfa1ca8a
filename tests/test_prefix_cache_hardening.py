"""Prefix-cache hardening: entries are keyed by the engine's fingerprint (config, weights digest, KV
layout), so a model of the same shapes with other weights or another KV layout misses and prefills
cold; a tampered position or a damaged file is a miss with a warning, never a reuse; the atomic writer
gives files the umask's mode.

One compiled prefill (the FP8-state engine of test_engine.py: chunk 32, bucket 512), shared by two
models of identical structure; prompts of 160..200 tokens (one 128-token prefix)."""
import json
import os
import stat
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax.engine import Engine
from v4jax.serving import PrefixCache, load_prefix_state, save_npz_atomic

V = "tiny-a-bf16"
ENGINE = {"max_context": 512, "batch": 1, "min_bucket": 512, "kv_layout": "fp8", "prefill_chunk": 32,
          "fixed_chunk": True}


@pytest.fixture(scope="module")
def eng_a(loaded):
    return Engine(loaded[V], **ENGINE)


@pytest.fixture(scope="module")
def eng_b(loaded):
    """The same model with other weights (same config, shapes and dtypes: same compiled steps)."""
    graphdef, state = nnx.split(loaded[V])
    leaves, tdef = jax.tree.flatten(state)
    rng = np.random.default_rng(0)  # on the host: no compile per shape
    noisy = [jax.device_put(np.asarray(x) + 0.02 * rng.standard_normal(x.shape).astype(x.dtype), x.sharding)
             if jnp.issubdtype(x.dtype, jnp.floating) else x for x in leaves]  # placed like A's: same compiles
    return Engine(nnx.merge(graphdef, jax.tree.unflatten(tdef, noisy)), **ENGINE)


@pytest.fixture(scope="module")
def prompts(expected):
    toks = expected[V]["tokens"][0]
    return toks[:200].tolist(), toks[:128].tolist() + toks[300:332].tolist()  # share the first 128 tokens


def _cold(eng, prompt):
    eng.reset()
    return eng.prefill([prompt])


def _saved(cache, eng, n_tokens, prompt):
    """(path of the file cached for prompt[:n_tokens], its row)."""
    fp = cache.fingerprint(eng)
    path = cache._path(cache.key(prompt[:n_tokens], fp))
    return path, load_prefix_state(path)


def test_same_model_reuses(eng_a, prompts, tmp_path):
    p1, p2 = prompts
    cache = PrefixCache(str(tmp_path))
    _, hit1 = cache.prefill(eng_a, p1)
    warm, hit2 = cache.prefill(eng_a, p2)
    assert (hit1, hit2) == (0, 128)
    assert np.abs(warm - _cold(eng_a, p2)).max() <= 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a good file: no warning
        disk, hit3 = PrefixCache(str(tmp_path)).prefill(eng_a, p2)
    assert hit3 == 128 and np.abs(disk - warm).max() <= 1e-6
    assert Engine(eng_a.model, **ENGINE).fingerprint() == eng_a.fingerprint()  # stable across engines


def test_other_weights_same_shapes_miss(eng_a, eng_b, prompts, tmp_path):
    p1, p2 = prompts
    assert eng_a.fingerprint() != eng_b.fingerprint()
    assert eng_a.fingerprint().split(" weights=")[0] == eng_b.fingerprint().split(" weights=")[0]  # config equal
    cache = PrefixCache(str(tmp_path))
    cache.prefill(eng_a, p1)  # A's state at 128 tokens, in memory and on disk
    fp_b = cache.fingerprint(eng_b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PrefixCache(str(tmp_path)).get(p2[:128], fp_b) is None  # a new process: nothing for B on disk
    cold_b = _cold(eng_b, p2)
    got, hit = cache.prefill(eng_b, p2)
    assert hit == 0 and np.abs(got - cold_b).max() <= 1e-5
    # what the old token-only key did: A's state under B's weights is far from B's cold run
    _, row_a = _saved(cache, eng_a, 128, p1)
    eng_b.reset()
    eng_b.import_row(row_a)
    assert np.abs(eng_b.prefill([p2[128:]]) - cold_b).max() > 0.1
    # a file of A renamed to B's key: its stored fingerprint does not match -> a miss, with a warning
    path_a, _ = _saved(cache, eng_a, 128, p1)
    fresh = PrefixCache(str(tmp_path))
    os.replace(path_a, fresh._path(fresh.key(p2[:128], fp_b)))  # over B's own file
    with pytest.warns(UserWarning, match="another model"):
        assert fresh.get(p2[:128], fp_b) is None


def test_other_kv_layout_or_tag_misses(loaded, eng_a, prompts, tmp_path):
    p1, _ = prompts
    cache = PrefixCache(str(tmp_path))
    cache.prefill(eng_a, p1)
    fp_a = cache.fingerprint(eng_a)
    assert cache.get(p1[:128], fp_a) is not None
    plain = Engine(loaded[V], **{**ENGINE, "kv_layout": None})
    for fp in (cache.fingerprint(plain), PrefixCache(tag="rev2").fingerprint(eng_a)):
        assert fp != fp_a
        assert cache.get(p1[:128], fp) is None and PrefixCache(str(tmp_path)).get(p1[:128], fp) is None
    with pytest.raises(ValueError, match="another model or KV layout"):  # the engine refuses it too
        plain.import_row(cache.get(p1[:128], fp_a))


@pytest.mark.parametrize("pos", [127, 129, -1, 1.5e2, "128", True, None])
def test_tampered_pos_rejected(eng_a, prompts, tmp_path, pos):
    p1, _ = prompts
    cache = PrefixCache(str(tmp_path))
    cache.prefill(eng_a, p1)
    path, _ = _saved(cache, eng_a, 128, p1)
    with np.load(path) as z:  # rewritten with a tampered position
        arrays = dict(z)
    meta = json.loads(bytes(arrays["meta"]).decode())
    meta["pos"] = pos
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    save_npz_atomic(path, arrays)
    with pytest.raises(ValueError, match="pos"):
        load_prefix_state(path)
    with pytest.warns(UserWarning, match="pos"):
        assert PrefixCache(str(tmp_path)).get(p1[:128], cache.fingerprint(eng_a)) is None


def test_tampered_row_refused_by_engine(eng_a, prompts, tmp_path):
    p1, _ = prompts
    cache = PrefixCache(str(tmp_path))
    cache.prefill(eng_a, p1)
    fp = cache.fingerprint(eng_a)
    row = cache.get(p1[:128], fp)
    for bad, msg in (({"pos": 132, "tokens": np.zeros(132, np.int64)}, "expects"),  # entry rows of pos 128
                     ({"pos": 129}, "tokens"), ({"pos": 600}, "0..512"), ({"pos": -3}, "0..512"),
                     ({"pend_h": row["pend_h"][:1]}, "streams")):
        with pytest.raises(ValueError, match=msg):
            eng_a.import_row({**row, **bad})
    with pytest.raises(ValueError, match="pos=0"):
        cache.put(p1[:128], {**row, "pos": 0}, fp)
    # a tampered entry in memory: the cache warns, drops it and prefills cold
    cache.mem[cache.key(p1[:128], fp)] = {**row, "pos": 132, "tokens": np.zeros(132, np.int64)}
    with pytest.warns(UserWarning, match="does not fit"):
        got, hit = cache.prefill(eng_a, p1)
    assert hit == 0 and np.abs(got - _cold(eng_a, p1)).max() <= 1e-5


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "no-meta"])
def test_damaged_file_is_a_miss(eng_a, prompts, tmp_path, damage):
    p1, _ = prompts
    PrefixCache(str(tmp_path)).prefill(eng_a, p1)
    cache = PrefixCache(str(tmp_path))
    path, _ = _saved(cache, eng_a, 128, p1)
    with open(path, "rb") as f:
        data = f.read()
    if damage == "no-meta":
        save_npz_atomic(path, {"tokens": np.asarray(p1[:128], np.int64)})
    else:
        body = {"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage]
        with open(path, "wb") as f:
            f.write(body)
    with pytest.raises(ValueError, match="not a readable v4jax prefix state"):
        load_prefix_state(path)
    with pytest.warns(UserWarning, match="prefix cache miss"):
        got, hit = cache.prefill(eng_a, p1)
    assert hit == 0 and np.abs(got - _cold(eng_a, p1)).max() <= 1e-5
    assert load_prefix_state(path)["pos"] == 128  # rewritten whole by the cold run


def test_atomic_writer_mode_follows_umask(eng_a, prompts, tmp_path):
    old = os.umask(0o022)
    try:
        for mask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
            os.umask(mask)
            path = tmp_path / f"out-{mask:o}.npz"
            save_npz_atomic(str(path), {"x": np.arange(3)})
            assert stat.S_IMODE(path.stat().st_mode) == mode
        os.umask(0o022)
        os.chmod(path, 0o640)  # replacing a file keeps its mode
        save_npz_atomic(str(path), {"x": np.arange(4)})
        assert stat.S_IMODE(path.stat().st_mode) == 0o640 and np.load(path)["x"].size == 4
        cache = PrefixCache(str(tmp_path / "cache"))  # prefix-cache files too
        cache.prefill(eng_a, prompts[0])
        (name,) = os.listdir(tmp_path / "cache")
        assert stat.S_IMODE((tmp_path / "cache" / name).stat().st_mode) == 0o644
    finally:
        os.umask(old)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
