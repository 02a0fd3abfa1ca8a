"""Token sampling (jit-friendly) and stop conditions.

`sample(logits_bv, key, temperature, top_k, top_p)`: temperature 0 is greedy (argmax); otherwise
the logits are divided by the temperature, cut to the top-k (k = 0: no cut) and to the smallest set
whose probability reaches top-p (1.0: no cut), and one token is drawn. All three knobs are traced
values, so one compiled decode step serves every setting.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int = 0
    max_new_tokens: int = 64
    stop_strings: tuple[str, ...] = ()
    stop_on_eos: bool = True
    vocab_limit: int = 0  # > 0: only ids below it are sampled (a tokenizer smaller than the embedding)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def knobs(self):
        """(temperature, top_k, top_p, vocab_limit) as arrays for the jitted step."""
        return (jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p),
                jnp.int32(self.vocab_limit))


def sample(logits_bv, key, temperature, top_k, top_p, vocab_limit=0):
    """-> token ids [B] int32. The knobs are scalars (one setting for every row) or [B] (one per row,
    the server's slots); `key` is one key, or [B] keys (each row draws with its own)."""
    logits = logits_bv.astype(jnp.float32)
    b, v = logits.shape
    row = lambda x: jnp.broadcast_to(jnp.asarray(x), (b,))[:, None]  # noqa: E731  scalar or [B] -> [B, 1]
    temperature, top_k, top_p = row(temperature), row(top_k), row(top_p)
    ids = jnp.arange(v)
    logits = jnp.where((vocab_limit <= 0) | (ids < vocab_limit), logits, -jnp.inf)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    sorted_desc = -jnp.sort(-scaled, axis=-1)  # [B, V]
    kth = jnp.take_along_axis(sorted_desc, jnp.clip(top_k - 1, 0, v - 1), axis=-1)
    thresh_k = jnp.where(top_k > 0, kth, -jnp.inf)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted entry
    kept = jnp.where(before < top_p, sorted_desc, jnp.inf)
    thresh_p = jnp.min(kept, axis=-1, keepdims=True)
    cut = jnp.where(scaled >= jnp.maximum(thresh_k, thresh_p), scaled, -jnp.inf)
    if key.shape:  # one key per row
        drawn = jax.vmap(lambda k, c: jax.random.categorical(k, c))(key, cut)
    else:
        drawn = jax.random.categorical(key, cut, axis=-1)
    return jnp.where(temperature[:, 0] > 0, drawn.astype(jnp.int32), greedy)


def find_stop(text: str, stop_strings) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    hits = [text.find(s) for s in stop_strings if s]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else None


def held_back(text: str, stop_strings) -> int:
    """Length of the longest suffix of `text` that may still grow into a stop string (not streamed yet)."""
    n = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n
