"""v4jax: DeepSeek-V4 in JAX / Flax NNX. `v4jax.load(path)` is the Python API (v4jax/api.py); the
submodules are imported on use, so `import v4jax` itself loads nothing heavy."""


def load(path, **kwargs):
    """A hub checkpoint or train.py run directory -> a `v4jax.api.LoadedModel` with generate / chat /
    score (keyword arguments: see `v4jax.api.load`)."""
    from .api import load as _load

    return _load(path, **kwargs)


__all__ = ["load"]
