"""Timing helper: compile/warm-up excluded, median of >= 5 runs, block_until_ready, environment record."""
from __future__ import annotations

import os
import platform
import statistics
import time

import jax


def environment() -> dict:
    """What a result depends on: jax version, devices, XLA flags, host."""
    return {"jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "cpu_count": os.cpu_count(), "python": platform.python_version()}


def _block(x):
    return jax.block_until_ready(x)


def time_fn(fn, *args, runs: int = 5, warmup: int = 1) -> dict:
    """Median wall time of fn(*args) (outputs blocked on). Use for functions without donation."""
    runs = max(runs, 5)
    for _ in range(warmup):
        _block(fn(*args))
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        _block(fn(*args))
        ts.append(time.perf_counter() - t0)
    return _summary(ts)


def time_stateful(step, state, runs: int = 5, warmup: int = 1):
    """Time `state = step(state)` where `step` donates its state argument (buffers reused in place).

    -> (summary, final state). Each run is one call; the state threads through the calls."""
    runs = max(runs, 5)
    for _ in range(warmup):
        state = _block(step(state))
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        state = _block(step(state))
        ts.append(time.perf_counter() - t0)
    return _summary(ts), state


def time_paired(fa, fb, runs: int = 5) -> tuple[float, float]:
    """Medians of fa() and fb() (zero-argument, outputs blocked on) called alternately, one of each per
    round (compile + one warm-up each excluded): a shared, noisy CPU then slows both alike."""
    _block(fa()), _block(fb())
    ta, tb = [], []
    for _ in range(max(runs, 5)):
        for f, ts in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            _block(f())
            ts.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def time_calls(call, runs: int = 5, warmup: int = 1) -> dict:
    """Median wall time of a zero-argument callable that blocks by itself (e.g. Engine.decode)."""
    runs = max(runs, 5)
    for _ in range(warmup):
        call()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        ts.append(time.perf_counter() - t0)
    return _summary(ts)


def _summary(ts) -> dict:
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "runs": len(ts)}


def memory_bandwidth(mbytes: int = 128, runs: int = 5) -> float:
    """Sustained bytes/s of a donated, jitted x + 1 over an f32 array (read + write counted)."""
    import jax.numpy as jnp

    n = mbytes * 2 ** 20 // 4
    step = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    summ, _ = time_stateful(step, jnp.zeros((n,), jnp.float32), runs=runs, warmup=2)
    return 2 * n * 4 / summ["median_s"]


def fmt_s(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s"


def verdict(target: str, ok: bool, ratio: float, note: str = "") -> str:
    line = f"{target} {'PASS' if ok else 'FAIL'} ratio={ratio:.3f}"
    return line + (f"  ({note})" if note else "")
