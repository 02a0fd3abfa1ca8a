"""P1: decode-state bytes per context token for V4-Flash / V4-Pro, both layouts (eval_shape only)."""
from __future__ import annotations

from v4jax.config import ModelConfig
from v4jax.serving import kv_report

from . import model
from .timing import verdict

LAYOUTS = (("fp8", 0), ("bfloat16", 1))  # (kv_layout, column of the spec table)
TOL = {"fp8": 0.003, "bfloat16": 0.0}  # fp8: the spec's 584 B vs exact 583 B entries (3,509-3,514)


def run(quick: bool = False) -> dict:
    rows, ok_all, worst = [], True, 0.0
    print("P1  decode-state bytes per context token (jax.eval_shape, nothing allocated)")
    print(f"{'model':6} {'layout':9} {'measured':>10} {'cost model':>11} {'spec §1':>8} {'meas/model':>11}")
    for name in ("flash", "pro"):
        cfg = getattr(ModelConfig, name)()
        for layout, col in LAYOUTS:
            rep = kv_report(cfg, 8192, layout)
            meas = rep["bytes_per_token"]
            pred = model.kv_bytes_per_token(cfg, "fp8" if layout == "fp8" else "bf16")
            spec = model.SPEC_KV_TABLE[name][col]
            ratio = meas / pred
            ok = abs(ratio - 1) <= TOL[layout] + 1e-12 and abs(meas / spec - 1) <= 0.003
            ok_all &= ok
            worst = max(worst, abs(ratio - 1))
            print(f"{name:6} {layout:9} {meas:10.2f} {pred:11.2f} {spec:8d} {ratio:11.5f}"
                  f"  fixed {rep['fixed_bytes'] / 2**20:.1f} MiB/seq")
            rows.append({"model": name, "layout": layout, "measured": meas, "predicted": pred, "spec": spec,
                         "ratio": ratio, "fixed_bytes": rep["fixed_bytes"], "ok": bool(ok)})
    line = verdict("P1", ok_all, 1 + worst, "worst |measured/model - 1|; bf16 exact, fp8 within 0.3 % of spec")
    print(line)
    return {"rows": rows, "pass": bool(ok_all), "lines": [line]}
