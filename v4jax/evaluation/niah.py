"""Needle-in-a-haystack, RULER-style, generated at run time with the checkpoint's own tokenizer.

A sample is a prompt of `length` tokens: an instruction, a haystack of filler sentences with one or
more needles ("The special magic number for <key> is <7 digits>.") and a question whose answer is
the queried needle's value. Tasks:

  niah_single_repeat   one needle in one repeated paragraph
  niah_single_essay    one needle in essay-like prose (sentences of local text: --haystack, or the
                       docstrings of Python's standard library)
  niah_multikey        four needles with different keys in the prose; one is asked for
  niah_multivalue      four needles with the same key; every value is asked for
  passkey              (not in the default grid) one 5-digit pass key in the repeated paragraph

The queried needle sits at `depth` (0 = the start of the haystack, 1 = its end). Prompt tokens are
the concatenation of each piece's own tokenization (pieces start with their space), so every
needle's token span is known exactly (the indexer diagnosis needs it) and lengths are exact.

Scoring (exact match): the first number in the reply must be the value (single, multikey);
multivalue scores the fraction of the values among the reply's first four numbers. Everything is
drawn from one numpy Generator seeded by `seed`: the same seed gives the same grid.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sysconfig

import numpy as np

TASKS = ("niah_single_repeat", "niah_single_essay", "niah_multikey", "niah_multivalue")
EXTRA_TASKS = ("passkey",)  # one 5-digit pass key in the repeated paragraph (the retrieval recipe trains on it)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
N_NEEDLES = 4  # multikey, multivalue

REPEAT_PARAGRAPH = (" A slow river bends around the hill.", " Birds cross the field at dawn.",
                    " The town bell rings twice each evening.", " Rain is on its way again.",
                    " Nothing much changes here from year to year.")
INTRO = "A few special magic numbers are hidden in the text below. Read it and remember them.\n"
_ADJ = ("amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen", "lucky",
        "misty", "noble", "odd", "plain", "quiet", "rusty", "silent", "tidy", "vivid", "wild", "young", "zesty")
_NOUN = ("anchor", "badger", "candle", "desert", "engine", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "ladder", "meadow", "needle", "orchard", "pepper", "quarry", "ribbon", "saddle", "tunnel",
         "violin", "walnut", "yogurt", "zipper")


@dataclasses.dataclass
class Sample:
    task: str
    length: int  # the grid cell's context length (tokens)
    depth: float
    ids: list  # prompt tokens (BOS first)
    key: str
    values: list  # the values asked for, in needle order
    spans: list  # token spans [start, end) of the asked values in `ids`
    max_new_tokens: int


def local_sentences(path: str | None = None, limit: int = 6000) -> list[str]:
    """Essay-like sentences (each with a leading space): from the documents at `path` (any format
    v4jax.data reads), or from the module docstrings of Python's standard library."""
    if path:
        from ..data import iter_documents
        texts = iter_documents(path)
    else:
        texts = _stdlib_docstrings()
    out = []
    for text in texts:
        for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            if 30 <= len(s) <= 300 and s[0].isupper() and s[-1] in ".!?" and not _CODEISH.search(s):
                out.append(" " + s)
                if len(out) >= limit:
                    return out
    if len(out) < 10:
        raise ValueError(f"--haystack {path}: fewer than 10 usable prose sentences in it" if path else
                         "too few prose sentences in the standard library's docstrings")
    return out


def _stdlib_docstrings():
    root = sysconfig.get_paths()["stdlib"]
    for d, dirs, names in sorted(os.walk(root)):
        dirs[:] = sorted(x for x in dirs if x not in ("test", "tests", "idlelib", "site-packages", "lib2to3"))
        for n in sorted(names):
            if n.endswith(".py"):
                try:
                    with open(os.path.join(d, n), encoding="utf-8") as f:
                        m = _DOCSTRING.match(f.read(65536))
                except (UnicodeDecodeError, OSError):
                    continue
                if m:
                    yield m.group(2)


_DOCSTRING = re.compile(r'(?:\s|#[^\n]*\n)*[rRuU]?("""|\'\'\')(.*?)\1', re.S)  # a module's leading docstring


_CODEISH = re.compile(r"[>{}\[\]|=_`#\\]|\d{3}")  # code, markup or numbers (they would mimic a needle)


class _Pieces:
    """Tokenization of text pieces, cached (filler sentences repeat)."""

    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}

    def __call__(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = list(self.tok.encode(text))
        return self.cache[text]


def _key(rng, taken) -> str:
    while True:
        k = f"{_ADJ[rng.integers(len(_ADJ))]}-{_NOUN[rng.integers(len(_NOUN))]}"
        if k not in taken:
            return k


def _question(task: str, key: str) -> tuple[str, str]:
    if task == "passkey":
        return "\nQuestion: what is the pass key?\n", "Answer: The pass key is"
    if task == "niah_multivalue":
        return (f"\nQuestion: what are all the special magic numbers for {key}?\n",
                f"Answer: The special magic numbers for {key} are")
    return (f"\nQuestion: what is the special magic number for {key}?\n",
            f"Answer: The special magic number for {key} is")


def make_sample(task: str, length: int, depth: float, rng: np.random.Generator, pieces: _Pieces,
                sentences: list[str], bos_id: int, wrap=None) -> Sample:
    """One prompt of exactly `length` tokens (fewer only when the fixed parts alone exceed it: refused).
    wrap: (prefix text, suffix text) of a chat template around the user content, or None (raw)."""
    if task not in TASKS + EXTRA_TASKS:
        raise ValueError(f"unknown NIAH task '{task}': use one of {', '.join(TASKS + EXTRA_TASKS)}")
    filler = list(REPEAT_PARAGRAPH) if task in ("niah_single_repeat", "passkey") else sentences
    n = 1 if task.startswith("niah_single") or task == "passkey" else N_NEEDLES
    keys = [_key(rng, set())]
    if task == "niah_multikey":
        while len(keys) < n:
            keys.append(_key(rng, set(keys)))
    else:
        keys = keys * n
    values = []
    lo, hi = (10_000, 100_000) if task == "passkey" else (1_000_000, 10_000_000)
    while len(values) < n:
        v = str(int(rng.integers(lo, hi)))
        if v not in values:
            values.append(v)
    depths = [depth] + [float(rng.uniform()) for _ in range(n - 1)]
    if task == "passkey":
        keys = [""]
        needles = [[pieces(" The pass key is"), pieces(f" {values[0]}"), pieces(". Keep it in mind.")]]
    else:
        needles = [[pieces(f" The special magic number for {k} is"), pieces(f" {v}"), pieces(".")]
                   for k, v in zip(keys, values)]
    q, a = _question(task, keys[0])
    pre, post = wrap or ("", "")
    head = pieces(pre) + pieces(INTRO)
    if not head or head[0] != bos_id:
        head = [bos_id] + head
    tail = pieces(q) + pieces(post) + pieces(a)
    fixed = len(head) + len(tail) + sum(len(x) for nd in needles for x in nd)
    budget = length - fixed
    if budget < 0:
        raise ValueError(f"context length {length} is shorter than the {fixed} tokens a {task} prompt needs "
                         "without any haystack")
    # the haystack: filler sentences from a random start, cyclically, up to the budget
    hay, used, i = [], 0, int(rng.integers(len(filler)))
    while True:
        s = pieces(filler[i % len(filler)])
        if used + len(s) > budget:
            break
        hay.append(s)
        used += len(s)
        i += 1
        if not s:
            raise ValueError("a filler sentence tokenizes to nothing")
    ends = np.cumsum([0] + [len(s) for s in hay])
    slot = [int(np.searchsorted(ends, d * used, side="left")) for d in depths]  # insert before sentence slot
    order = sorted(range(n), key=lambda j: (slot[j], j))
    ids, spans = list(head), [None] * n
    h = 0
    for j in order:
        while h < slot[j]:
            ids += hay[h]
            h += 1
        ids += needles[j][0]
        spans[j] = (len(ids), len(ids) + len(needles[j][1]))
        ids += needles[j][1] + needles[j][2]
    for s in hay[h:]:
        ids += s
    ids += tail
    pad = length - len(ids)  # what the last sentence left of the budget: spaces before the question
    sp = pieces(" ")
    if pad > 0 and len(sp) == 1:  # (every needle lies before them: the spans stay)
        k = len(ids) - len(tail)
        ids[k:k] = sp * pad
    asked = list(range(n)) if task == "niah_multivalue" else [0]
    answer = pieces(" " + ", ".join(values[j] for j in asked) + ".")
    return Sample(task, length, float(depth), ids, keys[0], [values[j] for j in asked], [spans[j] for j in asked],
                  len(answer) + 4)


def build_grid(tokenizer, bos_id: int, tasks=TASKS, lengths=(1024,), depths=DEPTHS, samples: int = 2,
               seed: int = 0, haystack: str | None = None, wrap=None) -> list[Sample]:
    """Every (task, length, depth) cell, `samples` prompts each, from one Generator(seed)."""
    rng = np.random.default_rng(seed)
    pieces = _Pieces(tokenizer)
    sentences = local_sentences(haystack) if any(t not in ("niah_single_repeat", "passkey") for t in tasks) else []
    return [make_sample(t, L, d, rng, pieces, sentences, bos_id, wrap)
            for t in tasks for L in lengths for d in depths for _ in range(samples)]


def score(sample: Sample, reply: str) -> float:
    """Exact match: 1.0 / 0.0 (single, multikey); the fraction of the values found (multivalue)."""
    nums = re.findall(r"\d+", reply)
    if sample.task != "niah_multivalue":
        return float(bool(nums) and nums[0] == sample.values[0])
    got = set(nums[: len(sample.values)])
    return sum(v in got for v in sample.values) / len(sample.values)


def summarise(samples: list[Sample], scores, recalls=None) -> dict:
    """-> {task: {"lengths", "depths", "accuracy" [depth][length], "mean", and with recalls
    "indexer_recall": {layer: [depth][length]}}}."""
    out = {}
    for task in dict.fromkeys(s.task for s in samples):
        idx = [i for i, s in enumerate(samples) if s.task == task]
        lengths = sorted({samples[i].length for i in idx})
        depths = sorted({samples[i].depth for i in idx})

        def grid(vals):
            g = [[[] for _ in lengths] for _ in depths]
            for i in idx:
                if vals[i] is not None:
                    g[depths.index(samples[i].depth)][lengths.index(samples[i].length)].append(vals[i])
            return [[float(np.mean(c)) if c else None for c in row] for row in g]

        cell = {"lengths": lengths, "depths": depths, "accuracy": grid(scores),
                "mean": float(np.mean([scores[i] for i in idx]))}
        if recalls is not None:
            layers = sorted({k for i in idx for k in (recalls[i] or {})})
            cell["indexer_recall"] = {str(k): grid([(recalls[i] or {}).get(k) for i in range(len(samples))])
                                      for k in layers}
        out[task] = cell
    return out


def needle_recall(sample: Sample, picks, csa_layers, ratio: int = 4) -> dict:
    """Per CSA layer: the fraction of the compressed entries covering the asked values' tokens (entry
    j holds tokens [ratio*j, ratio*j + ratio)) that the indexer's top-k at the question's last token
    picked."""
    want = {j for a, b in sample.spans for j in range(a // ratio, (b - 1) // ratio + 1)}
    return {layer: len(want & set(np.asarray(p).tolist())) / len(want) for layer, p in zip(csa_layers, picks)}


def table(summary: dict) -> str:
    lines = []
    for task, cell in summary.items():
        lines.append(f"{task}: mean exact match {cell['mean']:.3f}")
        lines.append("  depth \\ length " + " ".join(f"{L:>8}" for L in cell["lengths"]))
        for d, row in zip(cell["depths"], cell["accuracy"]):
            lines.append(f"  {d:>14.2f} " + " ".join("       -" if v is None else f"{v:>8.2f}" for v in row))
        for layer, g in cell.get("indexer_recall", {}).items():
            flat = [v for row in g for v in row if v is not None]
            lines.append(f"  indexer recall, layer {layer}: {np.mean(flat):.3f}" if flat else "")
    return "\n".join(lines)


def heatmap(summary: dict, path: str) -> None:
    """One panel per task (depth x length, exact match 0..1, each cell annotated), PNG written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks) + 1.2, 3.4), squeeze=False,
                             constrained_layout=True)
    for i, (ax, task) in enumerate(zip(axes[0], tasks)):
        c = summary[task]
        a = np.array([[np.nan if v is None else v for v in row] for row in c["accuracy"]], float)
        im = ax.imshow(a, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(c["lengths"])), [_k(L) for L in c["lengths"]])
        ax.set_yticks(range(len(c["depths"])), [f"{d:.2f}" for d in c["depths"]])
        ax.set_xlabel("context (tokens)")
        if i == 0:
            ax.set_ylabel("needle depth")
        ax.set_title(f"{task}\nmean {c['mean']:.2f}", fontsize=9)
        for (r, k), v in np.ndenumerate(a):
            if np.isfinite(v):
                ax.text(k, r, f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="exact match")
    tmp = f"{path}.tmp.{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _k(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 else (f"{n >> 10}K" if n >= 1024 else str(n))
