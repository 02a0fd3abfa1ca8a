"""Serving on top of the decode engine: generation with stop conditions and streaming, MTP
speculative generation, a chat session that keeps its state across turns and answers quick
instructions from forks, an on-disk prefix cache, and the KV report.

Token bookkeeping: after `generate`, the state holds the prompt and every generated token except
the last one sampled (it has not been fed yet), exactly like a server between requests.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import secrets
import stat
import time
import warnings
import zipfile
import zlib
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from . import chat
from .engine import Engine, entries_for
from .sampling import SamplingConfig, find_stop, held_back, sample

PREFIX_ALIGN = 128  # lcm(4, 128): every compressed block of every layer is complete (spec §13.4)


@dataclasses.dataclass
class Generation:
    tokens: list
    text: str = ""
    finish: str = "length"  # "eos" | "stop" | "length" | "interrupted"
    streamed: int = 0  # characters of `text` already handed to the stream callback


_sample_jit = jax.jit(sample)


class _Row:
    """Stop conditions and incremental detokenisation for one sequence."""

    def __init__(self, tok, sampling: SamplingConfig, eos_id: int, on_text, b: int):
        self.g, self.tok, self.sp, self.eos, self.on_text, self.b = Generation([]), tok, sampling, eos_id, on_text, b
        self.done = sampling.max_new_tokens == 0

    def push(self, t: int) -> None:
        if self.done:
            return
        g = self.g
        g.tokens.append(int(t))
        if self.sp.stop_on_eos and t == self.eos:
            g.finish, self.done = "eos", True
        elif len(g.tokens) >= self.sp.max_new_tokens:
            self.done = True
        if self.tok is None:
            return
        text = self.tok.decode(g.tokens[:-1] if g.finish == "eos" else g.tokens)
        cut = find_stop(text, self.sp.stop_strings)
        if cut is not None:
            text, g.finish, self.done = text[:cut], "stop", True
        g.text = text
        self._stream()

    def _stream(self):
        g = self.g
        end = len(g.text)
        if not self.done:
            end -= held_back(g.text, self.sp.stop_strings)
            while end > g.streamed and g.text[end - 1] == "\ufffd":  # an unfinished UTF-8 sequence
                end -= 1
        if self.on_text and end > g.streamed:
            self.on_text(self.b, g.text[g.streamed:end])
        g.streamed = max(g.streamed, end)


def generate(engine: Engine, prompts, sampling: SamplingConfig, tokenizer=None, on_text: Callable | None = None,
             speculative: bool = False, should_stop: Callable | None = None) -> dict:
    """Append `prompts` (one token list per row) to the engine's state and generate.

    -> {"outputs": [Generation per row], "steps", "prefill_s", "decode_s", "tokens_per_s", and for
    speculative decoding "acceptance" (accepted drafts / verify steps)}."""
    eos = engine.cfg.eos_token_id
    tok_vocab = getattr(tokenizer, "vocab_size", 0) or 0
    if 0 < tok_vocab < engine.cfg.vocab_size and not sampling.vocab_limit:
        sampling = dataclasses.replace(sampling, vocab_limit=tok_vocab)
    rows = [_Row(tokenizer, sampling, eos, on_text, b) for b in range(engine.batch)]
    if speculative and not engine.speculative:
        raise ValueError("speculative decoding needs an Engine built with speculative=True (it keeps the MTP state)")
    # a speculative row may keep advancing 2 positions per step while other rows finish
    need = engine.pos + np.array([len(p) for p in prompts]) + sampling.max_new_tokens * (2 if speculative else 1) + 2
    if np.any(need > engine.max_context):
        b = int(np.argmax(need))
        raise ValueError(f"sequence {b}: {len(prompts[b])} prompt tokens + {sampling.max_new_tokens} new tokens "
                         f"(+ {int(engine.pos[b])} already in the state) exceed the maximum context of "
                         f"{engine.max_context} tokens")
    if speculative and not sampling.greedy:
        raise ValueError("speculative decoding reproduces greedy decoding: use temperature 0")
    t0 = time.perf_counter()
    logits = engine.prefill(prompts)
    key = jax.random.key(sampling.seed)
    key, sub = jax.random.split(key)
    nxt = np.asarray(_sample_jit(jnp.asarray(logits), sub, *sampling.knobs()))
    t1 = time.perf_counter()
    steps = accepted = 0
    for r, t in zip(rows, nxt):
        r.push(t)
    draft = engine.draft(nxt, sampling.vocab_limit) if speculative else None
    while not all(r.done for r in rows) and not (should_stop and should_stop()):
        active = np.array([not r.done for r in rows])
        if speculative:
            committed, draft = engine.speculate(nxt, draft, sampling.vocab_limit)
            accepted += sum(len(c) - 1 for c, a in zip(committed, active) if a)
            for r, c in zip(rows, committed):
                for t in c:
                    r.push(t)
            nxt = np.array([c[-1] for c in committed])
        else:
            key, sub = jax.random.split(key)
            nxt, _ = engine.decode(nxt, sampling, sub, active=active)
            for r, t, a in zip(rows, nxt, active):
                if a:
                    r.push(t)
        steps += 1
    if should_stop and should_stop():
        for r in rows:
            if not r.done:
                r.g.finish, r.done = "interrupted", True
    for r in rows:
        r._stream()
    t2 = time.perf_counter()
    n_new = sum(len(r.g.tokens) for r in rows)
    out = {"outputs": [r.g for r in rows], "steps": steps, "prefill_s": t1 - t0, "decode_s": t2 - t1,
           "tokens_per_s": (n_new - len(rows)) / max(t2 - t1, 1e-9)}
    if speculative:
        out["acceptance"] = accepted / max(steps * engine.batch, 1)
    return out


# ------------------------------------------------------------------------------ chat session
class ChatSession:
    """One conversation (engine batch 1) in a reasoning mode; the state is kept across turns.

    Every prefill is split right after each EOS and right before each `<｜Assistant｜>`, with a
    snapshot (windows + tails only) at every split: a later prompt that rewrites history (earlier
    reasoning dropped) or a quick instruction branching at the end of a user turn restarts from the
    longest snapshot that is a prefix of both the state's tokens and the new prompt."""

    def __init__(self, engine: Engine, tokenizer, mode: str = "chat", texts: chat.PromptTexts | None = None,
                 sampling: SamplingConfig | None = None, max_snapshots: int = 64, speculative: bool = False):
        if engine.batch != 1:
            raise ValueError("a chat session needs an engine of batch 1")
        if mode not in chat.MODES:
            raise ValueError(f"unknown mode '{mode}': use one of {', '.join(chat.MODES)}")
        self.engine, self.tok, self.mode = engine, tokenizer, mode
        self.texts = texts or chat.DEFAULT_TEXTS
        self.sampling = sampling or SamplingConfig(max_new_tokens=256)
        self.messages: list[dict] = []
        self.tokens: list[int] = []  # what the state holds
        self.snaps: list[tuple[tuple, dict]] = []
        self.max_snapshots = max_snapshots
        self.speculative = speculative  # MTP speculative replies (greedy sampling); send reports the acceptance
        self._eos = engine.cfg.eos_token_id
        self._asst = self._special(self.texts.assistant)

    def _special(self, s):
        ids = self.tok.encode(s)
        return ids[0] if len(ids) == 1 else None

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text))

    # ------------------------------------------------------------ state sync
    def _split_points(self, ids, start):
        pts = [i + 1 for i in range(start, len(ids)) if ids[i] == self._eos]
        pts += [i for i in range(start, len(ids)) if ids[i] == self._asst and i > start]
        return sorted(set(p for p in pts if start < p < len(ids)))

    def sync(self, target: list[int], keep_last: int = 1) -> None:
        """Make the state hold `target[:-keep_last]` (the rest is prefilled by the caller's generate)."""
        want = target[: len(target) - keep_last]
        common = 0
        for a, b in zip(self.tokens, want):
            if a != b:
                break
            common += 1
        if common < len(self.tokens):
            cands = [(k, s) for k, s in self.snaps if len(k) <= common and list(k) == want[: len(k)]]
            if cands:
                k, s = max(cands, key=lambda ks: len(ks[0]))
                self.engine.restore(s)
                self.tokens = list(k)
            else:
                self.engine.reset()
                self.tokens = []
        self.snaps = [(k, s) for k, s in self.snaps if list(k) == self.tokens[: len(k)]]
        start = len(self.tokens)
        for p in self._split_points(want, start) + [len(want)]:
            if p > len(self.tokens):
                self.engine.prefill([want[len(self.tokens): p]])
                self.tokens = want[:p]
                self._snapshot()

    def _snapshot(self):
        if any(len(k) == len(self.tokens) for k, _ in self.snaps):
            return
        self.snaps.append((tuple(self.tokens), self.engine.snapshot()))
        self.snaps = self.snaps[-self.max_snapshots:]

    # ------------------------------------------------------------ turns
    def send(self, text: str, on_text=None, should_stop=None) -> dict:
        """User turn -> assistant reply {"reasoning", "content", "tool_calls", "finish", "tokens_per_s"}
        (+ "acceptance" when speculative)."""
        self.messages.append({"role": "user", "content": text})
        prompt = self.encode(chat.render(self.messages, mode=self.mode, texts=self.texts))
        self.sync(prompt)
        res = generate(self.engine, [prompt[len(self.tokens):]], self.sampling, self.tok, on_text,
                       speculative=self.speculative, should_stop=should_stop)
        g = res["outputs"][0]
        # what the state holds: the last sampled token is not in it yet (a plain step), or, when a stop
        # falls inside an accepted speculative pair, one token more: read it off the engine's position
        self.tokens = prompt + g.tokens[:int(self.engine.pos[0]) - len(prompt)]
        completion = g.text
        if self.mode != "chat" and self.texts.think_end not in completion:
            msg = {"reasoning": completion, "content": "", "tool_calls": []}  # reasoning not finished
        else:
            msg = chat.parse_completion(completion, self.texts)
        reply = {"role": "assistant", "content": msg["content"]}
        if msg["reasoning"] is not None:
            reply["reasoning_content"] = msg["reasoning"]
        if msg["tool_calls"]:
            reply["tool_calls"] = msg["tool_calls"]
        self.messages.append(reply)
        out = {**msg, "finish": g.finish, "tokens_per_s": res["tokens_per_s"]}
        return {**out, "acceptance": res["acceptance"]} if self.speculative and "acceptance" in res else out

    def quick(self, task: str, url: str | None = None, max_new_tokens: int = 32) -> str:
        """Answer a quick-instruction side task from a fork; the conversation's state is restored."""
        prefix, suffix = chat.quick_instruction_prompt(task, self.messages, self.mode, self.texts, url=url)
        main_snap, main_tokens = self.engine.snapshot(), list(self.tokens)
        try:
            pre = self.encode(prefix)
            self.sync(pre + [0], keep_last=1)  # the state holds exactly the prefix
            res = generate(self.engine, [self.encode(suffix)], SamplingConfig(max_new_tokens=max_new_tokens),
                           self.tok)
            return res["outputs"][0].text.strip()
        finally:
            self.engine.restore(main_snap)
            self.tokens = main_tokens
            self.snaps = [(k, s) for k, s in self.snaps if list(k) == main_tokens[: len(k)]]


# ------------------------------------------------------------------------------ prefix cache
class PrefixCache:
    """States of prompt prefixes (multiples of 128 tokens), in memory and optionally on disk.

    `prefill(engine, prompt)` restores the longest cached prefix of `prompt` (batch-1 engine), stores
    the state at the last 128-aligned point before the prompt's end, and prefills the rest.

    Entries are keyed by the engine's fingerprint (`Engine.fingerprint`: model config, a digest of the
    weights, KV layout, MTP on/off; plus `tag`, e.g. a checkpoint revision) and the tokens, and every
    file stores its fingerprint, tokens and position: another model, another checkpoint of the same
    shapes or another KV layout never reuses a state. A file that is damaged, was written for another
    fingerprint or holds a state that does not fit its position is a miss with a warning."""

    def __init__(self, directory: str | None = None, tag: str = ""):
        self.dir, self.tag = directory, tag
        self.mem: dict[str, dict] = {}
        if directory:
            os.makedirs(directory, exist_ok=True)

    @staticmethod
    def key(tokens, fingerprint: str) -> str:
        h = hashlib.sha256(fingerprint.encode())
        h.update(b"\0")
        h.update(np.asarray(tokens, np.int64).tobytes())
        return h.hexdigest()[:32]

    def fingerprint(self, engine: Engine) -> str:
        return engine.fingerprint() + (f" tag={self.tag}" if self.tag else "")

    def _path(self, key):
        return os.path.join(self.dir, f"prefix-{key}.npz")

    def get(self, tokens, fingerprint: str):
        """The state saved for `tokens` under `fingerprint`, or None (a bad file: None and a warning)."""
        k = self.key(tokens, fingerprint)
        if k in self.mem:
            return self.mem[k]
        path = self._path(k) if self.dir else None
        if not path or not os.path.exists(path):
            return None
        try:
            row = load_prefix_state(path)
        except ValueError as e:
            return _miss(str(e))
        if row["fingerprint"] != fingerprint:
            return _miss(f"{path}: saved for another model, checkpoint or KV layout "
                         f"({row['fingerprint'] or 'no fingerprint'}; this engine: {fingerprint})")
        if list(row["tokens"]) != list(tokens):
            return _miss(f"{path}: holds other tokens than its name says")
        self.mem[k] = row
        return row

    def put(self, tokens, row, fingerprint: str):
        if int(row["pos"]) != len(tokens):
            raise ValueError(f"a prefix state at pos={row['pos']} cannot be stored for {len(tokens)} tokens")
        k = self.key(tokens, fingerprint)
        row = {**row, "tokens": np.asarray(tokens, np.int64), "fingerprint": fingerprint}
        self.mem[k] = row
        if self.dir:
            save_prefix_state(self._path(k), row)

    def prefill(self, engine: Engine, prompt) -> tuple[np.ndarray, int]:
        """-> (logits of the prompt's last token [1, V], cached tokens reused)."""
        prompt = [int(t) for t in prompt]
        fp = self.fingerprint(engine)
        hit = 0
        engine.reset()
        for a in range((len(prompt) - 1) // PREFIX_ALIGN * PREFIX_ALIGN, 0, -PREFIX_ALIGN):
            row = self.get(prompt[:a], fp)
            if row is None:
                continue
            try:
                engine.import_row(row)  # refuses a state that does not fit its position: state untouched
            except ValueError as e:
                self.mem.pop(self.key(prompt[:a], fp), None)
                _miss(f"the cached state of {a} tokens does not fit this engine ({e})")
                continue
            hit = a
            break
        cut = (len(prompt) - 1) // PREFIX_ALIGN * PREFIX_ALIGN
        if cut > hit:
            engine.prefill([prompt[hit:cut]])
            self.put(prompt[:cut], engine.export_row(), fp)
        return engine.prefill([prompt[max(hit, cut):]]), hit


def _miss(msg: str) -> None:
    """Warn about a cache entry that cannot be used; the caller treats it as absent."""
    warnings.warn(f"prefix cache miss: {msg}", stacklevel=3)


def save_prefix_state(path: str, row: dict) -> None:
    """A row state (Engine.export_row + tokens, and the fingerprint PrefixCache adds) as one .npz,
    written atomically."""
    leaves, _ = jax.tree.flatten(row["state"])
    arrays = {f"leaf_{i}": np.asarray(x).view(np.uint8) for i, x in enumerate(leaves)}
    meta = {"dtypes": [str(np.asarray(x).dtype) for x in leaves], "shapes": [list(np.shape(x)) for x in leaves],
            "pos": int(row["pos"]), "fingerprint": str(row.get("fingerprint", ""))}
    arrays.update(tokens=np.asarray(row["tokens"], np.int64), pend_h=np.asarray(row["pend_h"], np.float32),
                  meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    save_npz_atomic(path, arrays)


def _new_file_beside(path: str, suffix: str) -> tuple[int, str]:
    """(fd, name) of a new file next to `path`, created with mode 0o666 so that the umask applies
    (tempfile.mkstemp's 0o600 would become the output's mode)."""
    d, base = os.path.split(path)
    for _ in range(100):
        tmp = os.path.join(d, f".{base}.{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def save_npz_atomic(path: str, arrays: dict) -> None:
    """np.savez to a temporary file beside `path`, then renamed over it: a reader never sees half a file.
    The file gets the mode a plain open() would give (0o666 less the umask), or keeps the mode of the
    file it replaces."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = _new_file_beside(path, ".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        if os.path.exists(path):
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# what a damaged or foreign file raises while being read (np.load opens the zip; members load lazily)
_READ_ERRORS = (OSError, EOFError, KeyError, ValueError, TypeError, zipfile.BadZipFile, zlib.error,
                UnicodeDecodeError)


def load_prefix_state(path: str) -> dict:
    """Inverse of save_prefix_state: {"state": [leaves], "pos", "tokens", "pend_h", "fingerprint"}
    (engine.import_row rebuilds the tree from its own structure). ValueError for a file that cannot be
    read (damaged, truncated, not a prefix state) or whose position is not its number of tokens."""
    try:
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            leaves = []
            for i, (dt, shape) in enumerate(zip(meta["dtypes"], meta["shapes"], strict=True)):
                dtype = np.dtype(getattr(ml_dtypes, dt, None) or dt)
                if dtype.hasobject:
                    raise ValueError(f"leaf {i} has dtype {dt}")
                leaves.append(z[f"leaf_{i}"].view(dtype).reshape(shape))
            tokens, pend_h = z["tokens"], z["pend_h"]
            pos, fingerprint = meta["pos"], meta.get("fingerprint", "")
    except _READ_ERRORS as e:
        raise ValueError(f"{path}: not a readable v4jax prefix state ({type(e).__name__}: {e})") from None
    if isinstance(pos, bool) or not isinstance(pos, int) or pos < 0:
        raise ValueError(f"{path}: prefix position pos={pos!r} is not a token count")
    if tokens.ndim != 1 or tokens.dtype != np.int64 or pos != tokens.size:
        raise ValueError(f"{path}: prefix position pos={pos} disagrees with its {tokens.size} stored tokens")
    return {"state": leaves, "pos": pos, "tokens": tokens, "pend_h": pend_h, "fingerprint": str(fingerprint)}


# ------------------------------------------------------------------------------ KV report
@functools.lru_cache(maxsize=8)
def _abstract_model(cfg):
    from .model import abstract

    return abstract(cfg)


def kv_report(cfg, context: int, kv_layout: str | None = "bfloat16") -> dict:
    """Bytes of one sequence's decode state, from the shapes of the real state (jax.eval_shape)."""
    model = _abstract_model(cfg)
    state = jax.eval_shape(lambda: model.init_state(1, context, kv_layout))
    n_main = cfg.num_hidden_layers
    kinds: dict[str, dict] = {}
    per_token = fixed = total = 0.0
    for i, st in enumerate(state["layers"] + state["mtp"]):
        r = cfg.compress_ratios[i]
        kind = "mtp" if i >= n_main else cfg.layer_kind(i)
        k = kinds.setdefault(kind, {"layers": 0, "fixed_bytes": 0, "bytes_per_token": 0.0, "entry_bytes": 0})
        k["layers"] += 1
        for name, leaf_tree in st.items():
            for sub, tree in (leaf_tree.items() if isinstance(leaf_tree, dict) and name != "win" else [("", leaf_tree)]):
                nbytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
                if sub == "kv":  # growing: one row per `r` tokens
                    n_rows = jax.tree.leaves(tree)[0].shape[1]
                    row = nbytes / n_rows
                    k["bytes_per_token"] += row / r
                    k["entry_bytes"] += nbytes
                    per_token += row / r
                    total += nbytes
                else:
                    k["fixed_bytes"] += nbytes
                    fixed += nbytes
                    total += nbytes
    return {"context": context, "kv_dtype": kv_layout or cfg.dtype, "bytes_per_token": per_token,
            "fixed_bytes": int(fixed), "total_bytes": int(total), "total_gib": total / 2 ** 30,
            "by_layer_type": kinds}


__all__ = ["generate", "ChatSession", "PrefixCache", "kv_report", "save_prefix_state", "load_prefix_state",
           "entries_for"]
