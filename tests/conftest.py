"""Shared test setup: 8 fake CPU devices (sharding tests), fixture paths, models loaded once."""
import gc
import os

# Tests are dominated by XLA:CPU compile time; LLVM's backend optimisation level 0 halves it without
# changing what is computed (the HLO passes still run). Subprocesses (CLI tests) inherit it.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
# The command-line tools turn on a persistent compilation cache; tests (and the CLI subprocesses they
# start) run without it unless a test asks for one (tests/test_run_dir.py).
os.environ.setdefault("V4JAX_COMPILE_CACHE", "off")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
VARIANTS = ("tiny-a-bf16", "tiny-a-fp8")


def fixture_dir(variant: str) -> str:
    return os.path.join(FIXTURES, variant)


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): two workers, one per core of the CI machine, fewer where the
    cores or the memory (about 8 GiB per worker at its peak) are fewer; never more, since XLA's own
    thread pools already use every core while a test runs. V4JAX_TEST_WORKERS overrides."""
    if os.environ.get("V4JAX_TEST_WORKERS"):
        return int(os.environ["V4JAX_TEST_WORKERS"])
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 16
    return max(1, min(2, os.cpu_count() or 1, int(mem_gib // 8)))


# The slowest test files first: with --dist loadfile and --no-loadscope-reorder (pyproject's addopts) a
# worker takes whole files in collection order, so starting the long ones early keeps one worker from
# running a long file alone at the end (xdist's own reordering sorts files by their number of tests).
SLOW_FIRST = ("test_training.py", "test_evaluation.py", "test_newest_jax.py", "test_server.py", "test_stack.py",
              "test_aot.py", "test_parity.py", "test_native.py", "test_multihost.py", "test_sparse_memory.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(SLOW_FIRST)))  # stable


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module. XLA:CPU maps each compiled kernel into its
    own three small memory regions and keeps them while the program is cached; over the whole suite
    (thousands of programs) the process reached the kernel's limit of 65,530 mappings
    (vm.max_map_count) and LLVM aborted inside a later compile. Clearing the caches returns them."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def expected():
    return {v: dict(np.load(os.path.join(fixture_dir(v), "expected.npz"))) for v in VARIANTS}


@pytest.fixture(scope="session")
def loaded():
    from v4jax import checkpoint
    return {v: checkpoint.load_hub(fixture_dir(v)) for v in VARIANTS}
