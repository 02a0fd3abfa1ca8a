"""`infer.py eval`: perplexity (`--task ppl`) and needle-in-a-haystack (`--task niah`) on a checkpoint.

  python infer.py eval --checkpoint DIR --task ppl --data FILE|DIR [--max-tokens N] [--out R.json]
  python infer.py eval --checkpoint DIR --task niah [--niah-tasks niah_single_repeat,...]
                       [--lengths 1024,4096,...] [--depths 0,0.25,0.5,0.75,1] [--samples 2] [--seed 0]
                       [--haystack FILE|DIR] [--mode raw|chat] [--diagnose-indexer] [--heatmap H.png]

Both show a progress bar on a terminal (a line every tenth of the work otherwise), print a table on
stdout and write the whole result as JSON to --out, atomically (a reader sees no half file).
"""
from __future__ import annotations

import json
import os
import sys
import time

ANSWER_ROOM = 64  # decode-state tokens kept free after the longest NIAH prompt for its reply


def add_parser(add, common) -> None:
    """Register `eval` on infer.py's sub-parsers (`add(name, text)` -> parser; `common(parser)` adds the
    checkpoint / dtype / weights / mesh / tokenizer options)."""
    e = add("eval", "perplexity or needle-in-a-haystack accuracy of a checkpoint (table + JSON)")
    common(e)
    e.add_argument("--task", required=True, choices=("ppl", "niah"), help="what to measure")
    e.add_argument("--out", default=None, help="JSON result file, written atomically (default: eval-TASK.json)")
    e.add_argument("--batch", type=int, default=1, help="sequences scored or decoded together")
    e.add_argument("--max-context", type=int, default=None, dest="max_context",
                   help="ppl: window length (default 4096, at most max_position_embeddings); niah: decode-state "
                        f"tokens (default: the longest length + {ANSWER_ROOM})")
    e.add_argument("--kv-dtype", choices=("fp8", "bfloat16", "float32"), default=None, dest="kv_dtype",
                   help="decode-state layout (default: the compute dtype)")
    p = n = e  # flat options (every one in `--help`'s options list); their help says which task they serve
    p.add_argument("--data", default=None, help="ppl: documents: .txt / .jsonl / .parquet file or a directory of them")
    p.add_argument("--max-tokens", type=int, default=None, dest="max_tokens",
                   help="ppl: stop taking documents after this many scored tokens (default: all)")
    n.add_argument("--niah-tasks", default=",".join(_niah().TASKS), dest="niah_tasks",
                   help="niah: comma-separated tasks (also: passkey)")
    n.add_argument("--lengths", default=None,
                   help="niah: comma-separated context lengths in tokens (default: 1024, 2048, ... up to "
                        f"max_position_embeddings - {ANSWER_ROOM}, at most 8 of them, the largest ones)")
    n.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="niah: comma-separated needle depths in [0, 1]")
    n.add_argument("--samples", type=int, default=2, help="niah: prompts per (task, length, depth) cell")
    n.add_argument("--seed", type=int, default=0, help="niah: the grid's seed (same seed, same prompts)")
    n.add_argument("--haystack", default=None, help="niah: prose for the essay filler (default: the Python standard "
                   "library's module docstrings)")
    n.add_argument("--mode", default="raw", help="niah: raw (a base model's prompt) or a chat mode: chat | "
                   "think-high | think-max (the prompt is one user message)")
    n.add_argument("--diagnose-indexer", action="store_true", dest="diagnose_indexer",
                   help="niah: per CSA layer, does the indexer's top-k at the question hold the needle's entries")
    n.add_argument("--heatmap", default=None, help="niah: PNG of the grid (default: --out with .png)")


def _niah():
    from . import niah
    return niah


def _ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give comma-separated integers, e.g. 1024,4096") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"{flag} {text!r}: give positive integers")
    return sorted(set(vals))


def _depths(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--depths {text!r}: give comma-separated numbers in [0, 1]") from None
    if not vals or not all(0 <= v <= 1 for v in vals):
        raise ValueError(f"--depths {text!r}: every depth must be within [0, 1]")
    return sorted(set(vals))


class _Progress:
    """A tqdm bar on a terminal (stderr), else a line at every tenth of the total."""

    def __init__(self, total: int, unit: str, desc: str):
        self.total, self.unit, self.desc, self.n, self.t0, self.next = total, unit, desc, 0, time.time(), 0.1
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit=unit, unit_scale=True, desc=desc, dynamic_ncols=True)

    def __call__(self, k: int) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
        elif self.n >= self.next * self.total or self.n == self.total:
            dt = time.time() - self.t0
            eta = dt / self.n * (self.total - self.n) if self.n else 0
            print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({dt:.0f}s, ETA {eta:.0f}s)", file=sys.stderr)
            while self.next * self.total <= self.n:
                self.next += 0.1

    def close(self):
        if self.bar is not None:
            self.bar.close()


def check_args(args, max_pos: int | None = None) -> None:
    """Refuse bad options before the model is loaded (max_pos: once it is known)."""
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.max_context is not None and args.max_context < 1:
        raise ValueError(f"--max-context must be >= 1, got {args.max_context}")
    if args.task == "ppl":
        if not args.data:
            raise ValueError("--task ppl needs --data FILE|DIR (the documents to score)")
        if not os.path.exists(args.data):
            raise ValueError(f"--data {args.data}: no such file or directory")
        if args.max_tokens is not None and args.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    else:
        from .. import chat
        known = _niah().TASKS + _niah().EXTRA_TASKS
        bad = [t for t in args.niah_tasks.split(",") if t not in known]
        if bad or not args.niah_tasks:
            raise ValueError(f"--niah-tasks: unknown task '{bad[0] if bad else ''}': use {', '.join(known)}")
        if args.mode not in ("raw",) + chat.MODES:
            raise ValueError(f"unknown mode '{args.mode}': use one of raw, {', '.join(chat.MODES)}")
        if args.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {args.samples}")
        _depths(args.depths)
        if args.lengths:
            _ints(args.lengths, "--lengths")
    if max_pos is not None and args.max_context is not None and args.max_context > max_pos:
        raise ValueError(f"--max-context must be within 1..{max_pos} (max_position_embeddings), got {args.max_context}")


def niah_lengths(args, max_pos: int) -> list[int]:
    top = max_pos - ANSWER_ROOM
    if args.lengths:
        lengths = _ints(args.lengths, "--lengths")
        if lengths[-1] > top:
            raise ValueError(f"--lengths {lengths[-1]}: longer than max_position_embeddings {max_pos} minus "
                             f"{ANSWER_ROOM} tokens kept for the reply")
        return lengths
    lengths = [1 << k for k in range(10, 31) if (1 << k) <= top] or [top]
    return lengths[-8:]


def _write_json(path: str, result: dict) -> None:
    from ..rundir import write_atomic

    write_atomic(path, json.dumps(result, indent=1, allow_nan=False) + "\n")


def run(args, load) -> int:
    """The `eval` command; `load()` -> a v4jax.api.LoadedModel (its engines are sized here)."""
    check_args(args)
    out = args.out or f"eval-{args.task}.json"
    for flag, path in (("--out", out), ("--heatmap", args.heatmap)):
        if path and os.path.isdir(path):
            raise ValueError(f"{flag} {path}: is a directory; give a file name")
        if path:  # made (and checked writable) before the model loads: no result is lost at the end
            d = os.path.dirname(os.path.abspath(path))
            try:
                os.makedirs(d, exist_ok=True)
            except OSError as e:
                raise ValueError(f"{flag} {path}: cannot make its directory ({e.strerror or e})") from None
            if not os.access(d, os.W_OK | os.X_OK):
                raise ValueError(f"{flag} {path}: the directory {d} is not writable")
    t0 = time.time()
    if args.task == "ppl":
        result = _run_ppl(args, load)
    else:
        result = _run_niah(args, load, out)
    result["seconds"] = round(time.time() - t0, 2)
    result["checkpoint"] = args.checkpoint
    _write_json(out, result)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _run_ppl(args, load) -> dict:
    from ..data import iter_documents, list_chunks
    from . import perplexity

    list_chunks(args.data)  # a missing or unreadable source is refused before the model loads
    m = load()
    max_pos = m.config.max_position_embeddings
    check_args(args, max_pos)
    m.max_context = args.max_context or min(4096, max_pos)
    bars = []

    def progress(total):
        bars.append(_Progress(total, "tok", "ppl"))
        return bars[-1]

    try:
        res = perplexity.evaluate(m.engine(args.batch), m.tokenizer, iter_documents(args.data), progress=progress,
                                  max_tokens=args.max_tokens)
    finally:
        for b in bars:
            b.close()
    print(perplexity.table(res))
    return {"task": "ppl", "data": args.data, "max_context": m.max_context, **res}


def _wrap(mode: str, texts):
    """(text before, text after) the user content of a one-message chat prompt in `mode`."""
    from .. import chat

    mark = "\x00CONTENT\x00"
    text = chat.render([{"role": "user", "content": mark}], mode=mode, texts=texts)
    pre, post = text.split(mark)
    return pre, post


def _run_niah(args, load, out: str) -> dict:
    from . import niah, run

    tasks = [t for t in args.niah_tasks.split(",") if t]
    depths = _depths(args.depths)
    m = load()
    max_pos = m.config.max_position_embeddings
    check_args(args, max_pos)
    lengths = niah_lengths(args, max_pos)
    ctx = args.max_context or lengths[-1] + ANSWER_ROOM
    if ctx < lengths[-1] + ANSWER_ROOM:
        raise ValueError(f"--max-context {ctx}: the longest length {lengths[-1]} needs at least "
                         f"{lengths[-1] + ANSWER_ROOM} (room for the reply)")
    m.max_context = ctx
    wrap = None if args.mode == "raw" else _wrap(args.mode, m.texts)
    samples = niah.build_grid(m.tokenizer, m.config.bos_token_id, tasks, lengths, depths, args.samples, args.seed,
                              args.haystack, wrap)
    eng = m.engine(args.batch)
    prog = _Progress(len(samples) * (2 if args.diagnose_indexer else 1), "prompt", "niah")
    try:
        replies = run.niah_replies(eng, m.tokenizer, samples, on_done=prog)
        recalls = run.indexer_recalls(eng, samples, on_done=prog) if args.diagnose_indexer else None
    finally:
        prog.close()
    scores = [niah.score(s, r) for s, r in zip(samples, replies)]
    summary = niah.summarise(samples, scores, recalls)
    print(niah.table(summary))
    png = args.heatmap or os.path.splitext(out)[0] + ".png"
    try:
        niah.heatmap(summary, png)
        print(f"wrote {png}", file=sys.stderr)
    except ImportError:
        png = None
        print("no heatmap: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    return {"task": "niah", "seed": args.seed, "mode": args.mode, "lengths": lengths, "depths": depths,
            "samples_per_cell": args.samples, "max_context": m.max_context, "heatmap": png, "grid": summary,
            "samples": [{"task": s.task, "length": s.length, "depth": s.depth, "key": s.key, "values": s.values,
                         "reply": r, "score": sc, **({"indexer_recall": {str(k): v for k, v in rc.items()}}
                                                     if recalls else {})}
                        for s, r, sc, rc in zip(samples, replies, scores, recalls or [None] * len(samples))]}
