"""R1: the long-context retrieval recipe (v4jax.evaluation.recipe): a small V4 with a 32-token window
trained at 16x its window, against its SWA-only twin. Full: V4 mean exact match >= 90 %, the twin
near chance (<= 10 %), dense CSA vs sparse top-k within 2 points. --quick: the V4 model beats its
twin (the accuracy rises above what a 32-token window allows)."""
from __future__ import annotations

import os
import tempfile

from v4jax.evaluation import recipe

from .timing import verdict


def run(quick: bool = False) -> dict:
    out = os.environ.get("V4JAX_RECIPE_OUT") or tempfile.mkdtemp(prefix="v4jax-recipe-")
    res = recipe.run_recipe(out, quick=quick)
    print(recipe.table(res))
    v4, dense, swa = (res[k]["accuracy"]["mean"] for k in ("v4", "v4_dense", "swa"))
    if quick:
        ok = v4 > swa
        note = f"quick: V4 {100 * v4:.1f} % vs SWA twin {100 * swa:.1f} %"
    else:
        ok = v4 >= 0.9 and swa <= 0.1 and abs(dense - v4) <= 0.02
        note = f"V4 {100 * v4:.1f} % (>= 90), twin {100 * swa:.1f} % (<= 10), dense {100 * dense:.1f} % (within 2)"
    line = verdict("R1", ok, v4 / max(swa, 1e-3), note + f"; {res['wall_seconds'] / 60:.1f} min, results in {out}")
    print(line)
    return {"results": res, "pass": bool(ok), "lines": [line]}
