"""Row states of token prefixes shared across requests, in host memory, bounded by bytes (LRU).

An entry is one slot's state (`Slots.read`) after exactly `tokens` were fed: a prompt's last
128-aligned prefix and every 128 tokens of a reply (serving.PREFIX_ALIGN: every compressed block of
every layer is complete there), and the exact branch points of chat prompts (the system prompt's
end, for requests that share it; the points quick instructions fork from).
Entries are keyed by a hash of their tokens and hold the tokens themselves, so a hash collision is a
miss, never a wrong state. The cache holds one model's states (the server's engine): nothing here
is written to disk (serving.PrefixCache is the on-disk cache of the batch-1 paths).
"""
from __future__ import annotations

import collections
import hashlib
import threading

import jax
import numpy as np


def _key(tokens) -> bytes:
    return hashlib.sha256(np.asarray(tokens, np.int64).tobytes()).digest()


def row_bytes(row: dict) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(row["state"])) + np.asarray(row["pend_h"]).nbytes)


class StateCache:
    """LRU of row states by bytes: `put(tokens, row)`, `longest(tokens, limit)`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._rows: collections.OrderedDict[bytes, tuple[np.ndarray, dict, int]] = collections.OrderedDict()
        self._lengths: collections.Counter = collections.Counter()  # stored prefix lengths -> entries
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._lock = threading.Lock()  # the scheduler writes, /metrics reads

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, tokens) -> bool:
        return _key(tokens) in self._rows

    def put(self, tokens, row: dict) -> bool:
        """Store `row` (the state after exactly `tokens`); False when one entry exceeds the bound."""
        tokens = np.asarray(tokens, np.int64)
        if int(row["pos"]) != tokens.size:
            raise ValueError(f"a state at pos={row['pos']} cannot be stored for {tokens.size} tokens")
        n = row_bytes(row)
        if n > self.max_bytes:
            return False
        k = _key(tokens)
        with self._lock:
            if k in self._rows:
                self._rows.move_to_end(k)
                return True
            while self._rows and self.bytes + n > self.max_bytes:
                _, (old, _, nb) = self._rows.popitem(last=False)
                self._drop(old.size, nb)
                self.evictions += 1
            self._rows[k] = (tokens, row, n)
            self._lengths[tokens.size] += 1
            self.bytes += n
        return True

    def _drop(self, length: int, nbytes: int) -> None:
        self.bytes -= nbytes
        self._lengths[length] -= 1
        if not self._lengths[length]:
            del self._lengths[length]

    def longest(self, tokens, limit: int) -> tuple[dict | None, int]:
        """(row, n): the longest stored prefix tokens[:n] with n <= limit, or (None, 0)."""
        tokens = np.asarray(tokens, np.int64)
        with self._lock:
            for n in sorted((n for n in self._lengths if n <= min(limit, tokens.size)), reverse=True):
                hit = self._rows.get(_key(tokens[:n]))
                if hit is not None and np.array_equal(hit[0], tokens[:n]):
                    self._rows.move_to_end(_key(tokens[:n]))
                    self.hits += 1
                    return hit[1], n
            self.misses += 1
        return None, 0
