"""T1: TPU compile time and generated-code size of the train step against depth, scanned vs unrolled.

On this CPU machine, with libtpu: the trainer's real train step (`Trainer(..., abstract=True)
.compile_plan()`, the code path of `train.py --compile-only`) compiled by the TPU compiler for a v5p
slice. Configs: tiny.json's width with [SWA#] + (CSA, HCA) x k rows (depth L = 1 + 2k), at L and
2L - 1 (k and 2k rows), each with the layers scanned (`scan_layers`, the default) and unrolled.
Target: scanned, compile time and code size grow < 1.25x from L to 2L; unrolled they grow ~2x.
--quick: k = 2 / 4 at S = 256; full: k = 4 / 8 at S = 1024. Without libtpu: SKIP.
"""
from __future__ import annotations

import json
import os
import tempfile

from v4jax import aot
from v4jax.config import ModelConfig
from v4jax.trainer import RunConfig, Trainer

from .timing import verdict

TOPOLOGY = "v5p:2x2x1"
TARGET = 1.25


def _config(rows: int, path: str) -> str:
    raw = ModelConfig.tiny().to_hub()
    raw.update(num_hidden_layers=1 + 2 * rows, compress_ratios=[0] + [4, 16] * rows + [0])
    with open(path, "w") as f:
        json.dump(raw, f)
    return path


def measure(rows: int, scan: bool, seq: int, devices) -> dict:
    with tempfile.TemporaryDirectory() as d:
        rc = RunConfig(config=_config(rows, os.path.join(d, "c.json")), mesh="fsdp=2,expert=2", batch=4,
                       seq_len=seq, scan_layers=scan)
        rep = Trainer(rc, devices=devices, abstract=True).compile_plan()
    return {"layers": 1 + 2 * rows, "scan": scan, "compile_s": rep["compile_s"],
            "code_bytes": rep["generated_code_bytes"], "temp_bytes": rep["per_device"]["temp_bytes"]}


def run(quick: bool = False) -> dict:
    try:
        devices = aot.tpu_devices(TOPOLOGY)[:4]
    except aot.AOTError as e:
        return {"lines": [f"T1 SKIP ({e})"], "pass": True}
    k, seq = (2, 256) if quick else (4, 1024)
    rows = {(r, s): measure(r, s, seq, devices) for s in (True, False) for r in (k, 2 * k)}
    lines = []
    ok = True
    for scan in (True, False):
        a, b = rows[(k, scan)], rows[(2 * k, scan)]
        t, c = b["compile_s"] / a["compile_s"], b["code_bytes"] / a["code_bytes"]
        name = "scanned" if scan else "unrolled"
        print(f"  {name:8s} L={a['layers']}: {a['compile_s']:6.1f} s, code {a['code_bytes'] / 1e6:6.1f} MB | "
              f"L={b['layers']}: {b['compile_s']:6.1f} s, code {b['code_bytes'] / 1e6:6.1f} MB | x{t:.2f} time, x{c:.2f} code")
        if scan:
            ok = t < TARGET and c < TARGET
            lines.append(verdict("T1", ok, max(t, c), f"scanned train step L={a['layers']}->{b['layers']}: "
                                 f"compile x{t:.2f}, code x{c:.2f}; target < {TARGET}x"))
        else:
            lines.append(f"T1 INFO unrolled L={a['layers']}->{b['layers']}: compile x{t:.2f}, code x{c:.2f}")
    for ln in lines:
        print(ln)
    return {"lines": lines, "pass": ok, "rows": [dict(v) for v in rows.values()], "topology": TOPOLOGY, "seq": seq}
