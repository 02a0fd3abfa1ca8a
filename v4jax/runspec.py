"""The schedule strings of a run configuration: recipe phases, sequence-length stages, QAT options."""
from __future__ import annotations


def parse_phases(spec: str, steps: int) -> list[tuple[str, int]]:
    """"dense:40,indexer_warmup:60,sparse" -> [("dense", 40), ("indexer_warmup", 60), ("sparse", steps)]."""
    if not spec:
        return [("", steps)]
    out, prev = [], 0
    for part in spec.split(","):
        name, _, until = part.strip().partition(":")
        if name not in ("dense", "indexer_warmup", "sparse"):
            raise ValueError(f"phases: unknown phase '{name}' (dense, indexer_warmup, sparse)")
        end = int(until) if until else steps
        if end <= prev:
            raise ValueError(f"phases: '{part}' must end after step {prev}")
        out.append((name, end))
        prev = end
    out[-1] = (out[-1][0], max(out[-1][1], steps))
    return out


def parse_seq_stages(spec: str, steps: int) -> list[tuple[int, int]]:
    """"128:40,256" -> [(128, 40), (256, steps)]: seq_len 128 until step 40, then 256 to the end."""
    out, prev = [], 0
    parts = [p.strip() for p in str(spec).split(",")]
    for i, part in enumerate(parts):
        length, sep, until = part.partition(":")
        try:
            length = int(length)
            end = int(until) if sep else steps
        except ValueError:
            raise ValueError(f"seq_stages: '{part}' is not SEQ_LEN:UNTIL_STEP") from None
        if length < 1:
            raise ValueError(f"seq_stages: sequence length {length} must be positive")
        if not sep and i < len(parts) - 1:
            raise ValueError(f"seq_stages: only the last stage may leave out its end step ('{part}')")
        if end <= prev:
            raise ValueError(f"seq_stages: '{part}' must end after step {prev}")
        out.append((length, end))
        prev = end
    out[-1] = (out[-1][0], max(out[-1][1], steps))
    return out


QAT_OPTIONS = {"fp8_linear": "qat_fp8_linear", "fp4_experts": "qat_fp4_experts", "fp4_indexer": "qat_sim"}


def parse_qat(spec: str) -> dict:
    """"fp8_linear,fp4_experts,fp4_indexer" -> the ModelConfig run-time fields they turn on."""
    out = {}
    for name in filter(None, (p.strip() for p in str(spec).split(","))):
        if name not in QAT_OPTIONS:
            raise ValueError(f"qat: unknown option '{name}' ({', '.join(QAT_OPTIONS)})")
        out[QAT_OPTIONS[name]] = True
    return out


def settings_help(cls) -> str:
    """Every setting of the run dataclass `cls` (RunConfig): name, what it accepts, default, and the
    comment written beside it in the source (the one place each setting is described)."""
    import dataclasses
    import inspect

    from .validate import RUN_KEYS

    notes, pending = {}, []
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("#"):
            pending.append(text.lstrip("# "))
            continue
        name = text.split(":")[0].strip()
        if name.isidentifier() and ":" in text and "=" in text and not text.startswith(("def ", "return")):
            _, _, tail = text.partition("#")
            notes[name] = " ".join(pending + ([tail.strip()] if tail else []))
        pending = [] if not text.startswith("#") else pending
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append(f"  {f.name} = {default!r}  ({RUN_KEYS[f.name].allowed()})"
                    + (f"\n      {notes[f.name]}" if notes.get(f.name) else ""))
    return "\n".join(rows)
