"""Continuous batching: requests wait in a bounded queue, take a free decode slot between steps,
prefill in chunks inside the same mixed steps that decode the other slots, and leave their slot at
EOS, a stop string, the length limit or a cancel (a client that went away).

One thread owns the engine (`Scheduler.run`, started by `start()`); the web layer only calls
`submit`, `cancel`, `drain` and reads the counters. Each request reports through its `on_event`
callback, called on the scheduler thread with plain dicts:

  {"type": "text", "text": piece}                        streamed text (stop strings held back)
  {"type": "done", "finish": "stop"|"length"|"cancelled", "text", "tokens", "prompt_tokens",
   "cached_tokens", "completion_tokens"}                 exactly once per admitted request
  {"type": "error", "status": 503|500, "message"}       instead of "done" (shutdown, internal error)

Per round (`_step`): prefilling slots, oldest first, share a budget of `Slots.chunk` prompt tokens,
each chunk run for its slot alone (`Slots.prefill_row`: T tokens of compute, not B x T); then one
mixed step feeds every decoding slot its last sampled token. A prefill chunk ends at every point
whose state the prefix cache keeps (the prompt's last 128-aligned point, the request's branch
points), so that state can be read off the slot right after it.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import secrets
import threading
import time
from typing import Callable

import numpy as np

from ..sampling import SamplingConfig
from ..serving import PREFIX_ALIGN, _Row
from .slots import Slots
from .state_cache import StateCache

log = logging.getLogger("v4jax.server")


class QueueFull(Exception):
    """The waiting queue is at its bound (HTTP 429)."""


class Draining(Exception):
    """The server is shutting down and admits nothing new (HTTP 503)."""


@dataclasses.dataclass(eq=False)
class Request:
    prompt: list[int]
    sampling: SamplingConfig
    on_event: Callable[[dict], None]
    save_at: tuple[int, ...] = ()  # prompt lengths whose exact states the cache keeps (quick-instruction branches)
    cache: bool = True  # start from the longest cached prefix
    store: bool = True  # keep states in the prefix cache (False: a quick-instruction fork writes nothing)
    id: str = dataclasses.field(default_factory=lambda: secrets.token_hex(12))
    # filled in by the scheduler
    slot: int | None = None
    fed: int = 0  # prompt tokens in the slot's state
    cached: int = 0  # of them, restored from the prefix cache
    saves: tuple[int, ...] = ()
    count: int = 0  # tokens sampled
    last: int = 0  # the last sampled token (not fed yet)
    cancelled: bool = False
    row: _Row | None = None
    t_submit: float = 0.0
    t_first: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)


class Scheduler:
    def __init__(self, slots: Slots, tokenizer, cache: StateCache | None = None, max_queue: int = 64,
                 kv_bytes_per_token: float = 0.0, kv_fixed_bytes: int = 0):
        self.slots, self.tok, self.cache, self.max_queue = slots, tokenizer, cache, max_queue
        self.eos = slots.cfg.eos_token_id
        tv = getattr(tokenizer, "vocab_size", 0) or 0
        self.vocab_limit = tv if 0 < tv < slots.cfg.vocab_size else 0
        self.kv_per_token, self.kv_fixed = kv_bytes_per_token, kv_fixed_bytes
        self.waiting: collections.deque[Request] = collections.deque()
        self.active: dict[int, Request] = {}
        self.cv = threading.Condition()
        self.draining = self.stopped = False
        # every key exists from the start: /metrics copies the dict while this thread updates it
        self.counters = collections.Counter({k: 0 for k in (
            "requests_stop", "requests_length", "requests_cancelled", "requests_error", "prompt_tokens",
            "cached_tokens", "generated_tokens", "steps", "peak_slots_in_use")})
        self._recent: collections.deque = collections.deque()  # (time, tokens) of the last 10 s
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- the web layer's side
    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self.run, name="v4jax-scheduler", daemon=True)
        self._thread.start()
        return self

    def submit(self, req: Request) -> None:
        with self.cv:
            if self.draining or self.stopped:
                raise Draining("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting): retry later")
            req.t_submit = time.perf_counter()
            self.waiting.append(req)
            self.cv.notify()

    def cancel(self, req: Request) -> None:
        """Stop `req` (a client that went away): its slot is freed before the next step."""
        with self.cv:
            req.cancelled = True
            self.cv.notify()

    def drain(self) -> None:
        """Admit nothing new: waiting requests get a 503 error event; those in slots finish."""
        with self.cv:
            self.draining = True
            while self.waiting:
                self._error(self.waiting.popleft(), 503, "the server is shutting down")
            self.cv.notify()

    def idle(self) -> bool:
        return not self.active and not self.waiting

    def stop(self, timeout: float = 30.0) -> None:
        """Finish: requests still in slots get a 503 error event; the thread exits."""
        with self.cv:
            self.stopped = True
            self.cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict:
        now = time.perf_counter()
        with self.cv:
            while self._recent and now - self._recent[0][0] > 10:
                self._recent.popleft()
            recent = sum(n for _, n in self._recent)
            active = list(self.active.values())
            waiting = len(self.waiting)
        kv = sum(self.kv_fixed + self.kv_per_token * int(self.slots.pos[r.slot]) for r in active)
        return {"queue": waiting, "slots_in_use": len(active), "slots": self.slots.batch, "kv_bytes_in_use": int(kv),
                "tokens_per_s": recent / 10.0, **dict(self.counters)}

    # ---------------------------------------------------------------- the loop
    def run(self) -> None:
        while True:
            with self.cv:
                while not (self.stopped or self.waiting or self.active):
                    self.cv.wait()
                if self.stopped:
                    for r in list(self.active.values()) + list(self.waiting):
                        self._error(r, 503, "the server shut down before this request finished")
                    self.active.clear()
                    self.waiting.clear()
                    return
                freed = self._reap()
                self._admit(freed)
            if freed.any():
                self.slots.clear(freed)
            if self.active:
                try:
                    self._step()
                except Exception as e:  # keep serving: fail the requests in slots, empty them
                    log.exception("decode step failed")
                    mask = np.zeros(self.slots.batch, bool)
                    for b, r in list(self.active.items()):
                        self._error(r, 500, f"internal error in the decode step: {type(e).__name__}: {e}")
                        mask[b] = True
                    self.active.clear()
                    self.slots.clear(mask)

    def _reap(self) -> np.ndarray:
        """Free the slots of cancelled requests -> the mask of slots to clear."""
        freed = np.zeros(self.slots.batch, bool)
        for b, r in list(self.active.items()):
            if r.cancelled:
                self._finish(r, "cancelled")
                freed[b] = True
        return freed

    def _admit(self, freed: np.ndarray) -> None:
        free = [b for b in range(self.slots.batch) if b not in self.active]
        while free and self.waiting:
            r = self.waiting.popleft()
            if r.cancelled:
                continue
            b = free.pop(0)
            if freed[b]:  # cleared now: the cache write below must land on an empty row
                self.slots.clear(np.arange(self.slots.batch) == b)
                freed[b] = False
            self._place(r, b)

    def _place(self, r: Request, b: int) -> None:
        r.slot, r.row = b, _Row(self.tok, r.sampling, self.eos, lambda _b, piece: self._emit(r, piece), b)
        if r.cache and self.cache is not None:
            row, n = self.cache.longest(r.prompt, len(r.prompt) - 1)  # a token is left to give the logits
            if row is not None:
                self.slots.write(b, row)
                r.fed = r.cached = n
        if r.store and self.cache is not None:
            cut = (len(r.prompt) - 1) // PREFIX_ALIGN * PREFIX_ALIGN
            r.saves = tuple(sorted(p for p in {cut, *r.save_at} if r.fed < p <= len(r.prompt)))
        self.active[b] = r
        self.counters["peak_slots_in_use"] = max(self.counters["peak_slots_in_use"], len(self.active))
        self.counters["prompt_tokens"] += len(r.prompt)
        self.counters["cached_tokens"] += r.cached

    def _knobs(self, r: Request) -> tuple:
        sp = r.sampling
        return sp.seed & 0xFFFFFFFF, r.count, sp.temperature, sp.top_k, sp.top_p

    def _step(self) -> None:
        """One round: prompt chunks of the prefilling slots (oldest first, `Slots.chunk` tokens in all,
        each slot alone), then one decode step of every decoding slot."""
        done = np.zeros(self.slots.batch, bool)
        budget = self.slots.chunk
        for b, r in sorted(self.active.items(), key=lambda kv: kv[1].t_submit):
            if not r.prefilling or budget <= 0:
                continue
            stop = min([p for p in r.saves if p > r.fed] + [len(r.prompt)])
            n = min(budget, stop - r.fed)
            nxt = self.slots.prefill_row(b, r.prompt[r.fed: r.fed + n], self._knobs(r), self.vocab_limit)
            self.counters["steps"] += 1
            budget -= n
            r.fed += n
            if r.fed in r.saves:
                self.cache.put(r.prompt[: r.fed], self.slots.read(b))
            if not r.prefilling:
                r.t_first = time.perf_counter()
                done[b] = self._push(r, nxt)
        feeds = {b: [r.last] for b, r in self.active.items() if not r.prefilling}
        if feeds:
            nxt = self.slots.step(feeds, {b: self._knobs(self.active[b]) for b in feeds}, self.vocab_limit)
            self.counters["steps"] += 1
            for b in feeds:
                r = self.active[b]
                if r.store and self.cache is not None and self.slots.pos[b] % PREFIX_ALIGN == 0:
                    held = r.prompt + r.row.g.tokens  # what the state holds now: a reply's aligned prefix
                    self.cache.put(held, self.slots.read(b))
                done[b] = self._push(r, int(nxt[b]))
        if done.any():
            self.slots.clear(done)

    def _push(self, r: Request, t: int) -> bool:
        """Hand the sampled token to the request -> True when it finished (its slot is freed)."""
        r.count, r.last = r.count + 1, t
        r.row.push(t)
        with self.cv:
            self._recent.append((time.perf_counter(), 1))
        self.counters["generated_tokens"] += 1
        if not r.row.done:
            return False
        r.row._stream()
        self._finish(r, r.row.g.finish)
        return True

    # ---------------------------------------------------------------- events
    def _emit(self, r: Request, piece: str) -> None:
        if not r.cancelled:
            r.on_event({"type": "text", "text": piece})

    def _finish(self, r: Request, finish: str) -> None:
        self.active.pop(r.slot, None)
        g = r.row.g
        finish = {"eos": "stop", "stop": "stop", "length": "length"}.get(finish, finish)
        self.counters[f"requests_{finish}"] += 1
        r.on_event({"type": "done", "finish": finish, "text": g.text, "tokens": list(g.tokens),
                    "prompt_tokens": len(r.prompt), "cached_tokens": r.cached, "completion_tokens": len(g.tokens),
                    "ttft_s": None if r.t_first is None else r.t_first - r.t_submit})

    def _error(self, r: Request, status: int, message: str) -> None:
        self.counters["requests_error"] += 1
        r.on_event({"type": "error", "status": status, "message": message})
