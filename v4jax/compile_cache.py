"""The persistent JAX compilation cache of the command-line tools (train.py, infer.py): on by default,
so the second start of the same run skips most of its compile time.

Where: $V4JAX_COMPILE_CACHE if set (a directory; "off" or "0" turns the cache off), else
$XDG_CACHE_HOME/v4jax/jax-compile (default ~/.cache/v4jax/jax-compile). A cache directory the user
already gave JAX (JAX_COMPILATION_CACHE_DIR, jax.config) is left as it is. Programs that compile in
under a second are not stored. JAX keys every entry by the program, the jax/XLA versions, the
backend and the compile options, so a stale entry is never reused; deleting the directory is safe.
"""
from __future__ import annotations

import os

ENV = "V4JAX_COMPILE_CACHE"


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "v4jax", "jax-compile")


def enable() -> str | None:
    """Turn the cache on (see the module doc) -> its directory, or None when it is off."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    where = os.environ.get(ENV, "").strip()
    if where.lower() in ("off", "0", "false", "no"):
        return None
    path = os.path.abspath(os.path.expanduser(where or default_dir()))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # an unwritable cache is no reason to fail a run
        print(f"warning: compilation cache {path} unusable ({e.strerror}); continuing without it")
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path
