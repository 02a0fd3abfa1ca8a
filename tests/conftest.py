"""Shared test setup: 8 fake CPU devices (sharding tests), fixture paths, models loaded once."""
import os

# Tests are dominated by XLA:CPU compile time; LLVM's backend optimisation level 0 halves it without
# changing what is computed (the HLO passes still run). Subprocesses (CLI tests) inherit it.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
VARIANTS = ("tiny-a-bf16", "tiny-a-fp8")


def fixture_dir(variant: str) -> str:
    return os.path.join(FIXTURES, variant)


@pytest.fixture(scope="session")
def expected():
    return {v: dict(np.load(os.path.join(fixture_dir(v), "expected.npz"))) for v in VARIANTS}


@pytest.fixture(scope="session")
def loaded():
    from v4jax import checkpoint
    return {v: checkpoint.load_hub(fixture_dir(v)) for v in VARIANTS}
