"""The newest supported JAX on Python 3.12 (what `pip install` brings on Colab) beside the oldest on
the suite's own Python: a Python 3.12 venv with today's jax / flax (pip's newest that pyproject.toml
admits) runs the parity, engine, kernel and core training tests in a subprocess. Skipped with a reason
when no Python 3.12 is found (pyenv's, or python3.12 on PATH) or when this already is Python >= 3.12."""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.environ.get("V4JAX_PY312_VENV", os.path.join(tempfile.gettempdir(), "v4jax-py312-venv"))
TESTS = ["tests/test_parity.py", "tests/test_engine.py", "tests/test_kernels.py",
         "tests/test_training.py::test_loss_falls", "tests/test_training.py::test_sparse_attention_recipe_phases",
         "tests/test_training.py::test_inference_reads_the_training_checkpoint"]


def _python312():
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = sorted(glob.glob(os.path.join(root, "versions", "3.12.*", "bin", "python3.12")))
    return found[-1] if found else shutil.which("python3.12")


def _run(cmd, timeout, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def test_core_tests_pass_with_the_newest_jax_on_python_312():
    if sys.version_info >= (3, 12):
        pytest.skip("the suite itself runs on Python >= 3.12 here")
    py = _python312()
    if not py:
        pytest.skip("no Python 3.12 found (pyenv install 3.12, or python3.12 on PATH)")
    vpy = os.path.join(VENV, "bin", "python")
    if not os.path.exists(vpy):
        r = _run([py, "-m", "venv", VENV], 300)
        assert r.returncode == 0, r.stderr[-2000:]
    r = _run([vpy, "-m", "pip", "install", "-q", "-e", ROOT, "pytest>=8", "pytest-xdist>=3.5"], 1200)
    assert r.returncode == 0, "pip install into the Python 3.12 venv failed:\n" + (r.stdout + r.stderr)[-3000:]
    v = _run([vpy, "-c", "import jax, flax, sys; print(sys.version.split()[0], jax.__version__, flax.__version__)"], 300)
    assert v.returncode == 0, v.stderr[-2000:]
    print("Python / jax / flax in the venv:", v.stdout.strip())
    env = {k: val for k, val in os.environ.items() if not k.startswith(("PYTEST_", "V4JAX_TEST_WORKERS"))}
    r = _run([vpy, "-m", "pytest", *TESTS, "-o", "addopts=", "-q", "-p", "no:cacheprovider"], 1800, cwd=ROOT, env=env)
    tail = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, f"core tests failed with {v.stdout.strip()}:\n{tail}"
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) >= 30 and " failed" not in r.stdout, tail
    print(f"{passed.group(0)} on Python / jax / flax {v.stdout.strip()}")
