"""python -m bench <name>|all [--quick] [--json OUT.json]"""
from __future__ import annotations

import argparse
import importlib
import json
import time

from .timing import environment

BENCHES = {"kv_bytes": "P1", "decode_attention": "P2", "moe": "P4", "prefill_attention": "P3", "mhc": "P6", "e2e_decode": "P7", "muon": "P5", "train_mfu": "G1", "gpu_decode": "G2",
           "tpu_compile": "T1", "load_checkpoint": "L1", "retrieval": "R1", "serve": "S1"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("name", choices=sorted(BENCHES) + ["all"])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (CI / a busy 2-core CPU)")
    ap.add_argument("--json", metavar="OUT.json", help="write every measured figure and verdict here")
    a = ap.parse_args(argv)
    env = environment()
    print(f"# jax {env['jax']} backend={env['backend']} devices={env['devices']} XLA_FLAGS={env['XLA_FLAGS']!r} "
          f"quick={a.quick}")
    names = list(BENCHES) if a.name == "all" else [a.name]
    results, lines, t0 = {}, [], time.perf_counter()
    for n in names:
        t1 = time.perf_counter()
        mod = importlib.import_module(f".{n}", __package__)
        r = mod.run(quick=a.quick)
        r["wall_s"] = time.perf_counter() - t1
        results[n] = r
        lines += [ln for ln in r["lines"] if ln.startswith(("P", "G", "T", "L", "R", "S"))]  # "G1 SKIP ..." passes
        print(f"# {n}: {r['wall_s']:.1f} s\n")
    wall = time.perf_counter() - t0
    print("# summary" + (f" (total {wall:.1f} s)" if len(names) > 1 else ""))
    for ln in lines:
        print(ln)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"env": env, "quick": a.quick, "wall_s": wall, "results": results}, f, indent=1, default=str)
    return 0 if all(r.get("pass", True) for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
