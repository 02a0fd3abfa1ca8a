"""notebooks/quickstart.ipynb runs top to bottom on the CPU (nbclient, a real Jupyter kernel): a
3-step training run, generation, chat, the three prompt modes, the KV-state plot and the indexer's
picks. Skipped with a reason when the notebook runner is not installed (the test extra has it)."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e '.[test]')")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e '.[test]')")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install -e '.[test]')")
    monkeypatch.setenv("V4JAX_NOTEBOOK_STEPS", "3")
    monkeypatch.setenv("V4JAX_NOTEBOOK_OUT", str(tmp_path / "run"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    text = {i: "".join(o.get("text", "") for o in c.get("outputs", []) if o.get("output_type") == "stream")
            for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    out = "\n".join(text.values())
    assert "working in " + ROOT in out
    assert "jax " in out and "on cpu" in out
    assert "step 3: loss" in out
    assert "LoadedModel(" in out
    for mode in ("chat", "think-high", "think-max"):
        assert f"--- {mode}" in out
    assert "flash: " in out and "pro: " in out and "1M context" in out
    assert "chance" in out
    assert images == 2  # the KV plot and the indexer's picks
    assert os.path.isdir(tmp_path / "run")
