"""S1: the OpenAI-compatible server (v4jax/server) under concurrent streaming clients, on the CPU.

The tiny fixture checkpoint (tests/fixtures/tiny-a-fp8, byte tokenizer: one token per byte) is
served in-process (uvicorn in a thread; every step shape compiled before the first request) with
16 decode slots, a 1024-token context and 64-token prefill chunks. A fixed, seeded list of chat
requests (user messages of 20..400 characters of random words, max_tokens 16..64, temperature 0)
is sent through the `openai` client with stream=True and include_usage:

  sequential  one client, one request at a time, for DURATION seconds
  concurrent  N clients (16; the full run also 64, queueing for the 16 slots), each sending its
              next request when the last one ends, for DURATION seconds (requests started before
              the deadline finish)

Every send tags its user message with a unique number at the start, so no phase is served from the
prefix cache (each compares cold prefill + decode). The tiny random model may stop early (EOS), so
throughput counts the completion tokens each request reports in its usage chunk: output tokens/s =
those tokens / the phase's wall time. Per request: TTFT (the first chunk with content, or the finish
chunk when the reply has none), inter-token latency (gaps between content chunks), and "lost": it
must end with exactly one finish_reason, one usage chunk with completion_tokens >= 1 and no more
content chunks than completion tokens (an HTTP error or a broken stream also counts as lost).
Prefix cache: a ~600-character system message with a short user message (cold), then the same system
message with another user message; the second's usage.prompt_tokens_details.cached_tokens and TTFT.

PASS: concurrent/sequential output tokens/s at N=16 >= 2.0, no request lost in any phase, and the
second prefix request's cached_tokens > 0. Absolute times are printed as information only.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import random
import socket
import string
import threading
import time

import numpy as np

from .timing import verdict

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "tiny-a-fp8")
SLOTS, MAX_CONTEXT, CHUNK, MAX_QUEUE = 16, 1024, 64, 128
N_REQUESTS, TARGET = 64, 2.0


def _text(rng: random.Random, n_chars: int) -> str:
    words = []
    while sum(len(w) + 1 for w in words) < n_chars:
        words.append("".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 9))))
    return " ".join(words)[:n_chars]


def requests_list(n: int = N_REQUESTS, seed: int = 0) -> list[tuple[str, int]]:
    """[(user message, max_tokens)]: fixed by the seed."""
    rng = random.Random(seed)
    return [(_text(rng, rng.randint(20, 400)), rng.randint(16, 64)) for _ in range(n)]


def _start_server():
    import uvicorn

    from v4jax import chat, checkpoint, data
    from v4jax.server.cli import build

    t0 = time.perf_counter()
    model = checkpoint.load_hub(FIXTURE, progress=False)
    svc, app = build(model, data.ByteTokenizer(), chat.DEFAULT_TEXTS, slots=SLOTS, max_context=MAX_CONTEXT,
                     chunk=CHUNK, max_queue=MAX_QUEUE, model_name="tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="s1-uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the uvicorn server did not start")
        time.sleep(0.05)
    print(f"S1  server up on port {port} in {time.perf_counter() - t0:.1f} s (load + compile "
          f"{svc.scheduler.slots.compiled_shapes()} step shapes), {SLOTS} slots x {MAX_CONTEXT} tokens, chunk {CHUNK}")
    return svc, server, thread, port


async def _one(client, messages, max_tokens: int) -> dict:
    """One streaming chat request -> its record (see the module docstring)."""
    rec = {"ttft": None, "itl": [], "pieces": 0, "usage": [], "finish": [], "cached": None, "error": None}
    t0 = last = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                rec["usage"].append(chunk.usage.completion_tokens)
                details = chunk.usage.prompt_tokens_details
                rec["cached"] = details.cached_tokens if details is not None else None
            for c in chunk.choices:
                if c.delta is not None and c.delta.content:
                    rec["pieces"] += 1
                    if rec["ttft"] is None:
                        rec["ttft"] = now - t0
                    else:
                        rec["itl"].append(now - last)
                    last = now
                if c.finish_reason is not None:
                    rec["finish"].append(c.finish_reason)
                    if rec["ttft"] is None:
                        rec["ttft"] = now - t0
    except Exception as e:  # counted as lost
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["ok"] = (rec["error"] is None and len(rec["finish"]) == 1 and len(rec["usage"]) == 1
                 and 1 <= rec["usage"][0] and rec["pieces"] <= rec["usage"][0])
    return rec


def _client(port: int):
    import openai

    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)


def _pct_ms(xs, q: float) -> float:
    return float(np.percentile(xs, q) * 1e3) if xs else float("nan")


async def _phase(port: int, reqs, clients: int, duration: float, tags) -> dict:
    """`clients` closed-loop clients over `reqs` for `duration` s -> throughput, latencies, losses."""
    client, recs = _client(port), []
    deadline = time.perf_counter() + duration

    async def loop(i: int) -> None:
        k = i * len(reqs) // clients  # clients start at different places in the list
        while time.perf_counter() < deadline:
            text, n = reqs[k % len(reqs)]
            k += 1
            recs.append(await _one(client, [{"role": "user", "content": f"#{next(tags)} {text}"}], n))

    t0 = time.perf_counter()
    await asyncio.gather(*(loop(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    ok = [r for r in recs if r["ok"]]
    tokens = sum(r["usage"][0] for r in ok)
    ttft, itl = [r["ttft"] for r in ok if r["ttft"] is not None], [g for r in ok for g in r["itl"]]
    return {"clients": clients, "wall_s": wall, "completed": len(ok), "lost": len(recs) - len(ok),
            "errors": sorted({r["error"] for r in recs if r["error"]})[:3], "tokens": tokens,
            "tokens_per_s": tokens / wall, "tokens_per_request": tokens / max(len(ok), 1),
            "ttft_p50_ms": _pct_ms(ttft, 50), "ttft_p99_ms": _pct_ms(ttft, 99),
            "itl_p50_ms": _pct_ms(itl, 50), "itl_p99_ms": _pct_ms(itl, 99)}


async def _prefix(port: int) -> dict:
    """A cold request with a ~600-character system message, then the same system message again.

    The scheduler keeps the state at the end of a chat's system message (a branch point), so the second
    request starts from the shared 601-token prefix whatever the first user message's length."""
    rng = random.Random(1)
    system = _text(rng, 600)
    client = _client(port)
    cold = await _one(client, [{"role": "system", "content": system}, {"role": "user", "content": _text(rng, 20)}], 16)
    warm = await _one(client, [{"role": "system", "content": system}, {"role": "user", "content": _text(rng, 24)}], 16)
    await client.close()
    return {"cold_ttft_ms": cold["ttft"] * 1e3 if cold["ttft"] else float("nan"), "cold_cached": cold["cached"],
            "warm_ttft_ms": warm["ttft"] * 1e3 if warm["ttft"] else float("nan"),
            "cached_tokens": warm["cached"] or 0, "lost": int(not cold["ok"]) + int(not warm["ok"])}


def _metrics(port: int) -> dict:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    want = ("v4jax_cached_tokens_total", "v4jax_prompt_tokens_total", "v4jax_generation_tokens_total")
    return {k: float(v) for k, v in (ln.split()[:2] for ln in text.splitlines() if ln.startswith(want))}


def _show(name: str, p: dict) -> None:
    print(f"  {name:<14} {p['tokens_per_s']:7.1f} output tok/s ({p['tokens']} tokens, {p['completed']} requests, "
          f"{p['tokens_per_request']:.1f} tok/request, {p['wall_s']:.1f} s); TTFT p50 {p['ttft_p50_ms']:.0f} / "
          f"p99 {p['ttft_p99_ms']:.0f} ms; ITL p50 {p['itl_p50_ms']:.1f} / p99 {p['itl_p99_ms']:.1f} ms; "
          f"lost {p['lost']}" + (f" {p['errors']}" if p["errors"] else ""))


async def _measure(port: int, quick: bool) -> dict:
    reqs, tags = requests_list(), itertools.count()
    duration = 8.0 if quick else 20.0
    client = _client(port)
    await _one(client, [{"role": "user", "content": "warm-up"}], 4)  # one request through the stack first
    await client.close()
    out = {"duration_s": duration, "sequential": await _phase(port, reqs, 1, duration, tags)}
    _show("sequential", out["sequential"])
    for n in (16,) if quick else (16, 64):
        out[f"concurrent_{n}"] = p = await _phase(port, reqs, n, duration, tags)
        _show(f"concurrent {n}", p)
    out["prefix"] = await _prefix(port)
    return out


def _verdicts(res: dict) -> tuple[bool, list[str]]:
    seq, c16, pre = res["sequential"], res["concurrent_16"], res["prefix"]
    ratio = c16["tokens_per_s"] / max(seq["tokens_per_s"], 1e-9)
    lost = sum(v["lost"] for v in res.values() if isinstance(v, dict) and "lost" in v)
    ok = ratio >= TARGET and lost == 0 and pre["cached_tokens"] > 0
    lines = [verdict("S1", ok, ratio, f"concurrent(16)/sequential output tok/s, target >= {TARGET:.1f}; "
                     f"lost {lost} (must be 0); prefix cached_tokens {pre['cached_tokens']} (must be > 0)")]
    if "concurrent_64" in res:
        c64 = res["concurrent_64"]
        r64 = c64["tokens_per_s"] / max(seq["tokens_per_s"], 1e-9)
        lines.append(f"    S1 detail: 64 clients on {SLOTS} slots: {r64:.2f}x sequential, TTFT p50 "
                     f"{c64['ttft_p50_ms']:.0f} ms vs {c16['ttft_p50_ms']:.0f} ms at 16")
    m = res["metrics"]
    lines.append(f"    S1 detail: prefix cache: second request cached {pre['cached_tokens']} tokens, TTFT "
                 f"{pre['warm_ttft_ms']:.0f} ms vs cold {pre['cold_ttft_ms']:.0f} ms; /metrics cached "
                 f"{m.get('v4jax_cached_tokens_total', 0):.0f} of {m.get('v4jax_prompt_tokens_total', 0):.0f} "
                 f"prompt tokens")
    return ok, lines


def run(quick: bool = False) -> dict:
    svc, server, thread, port = _start_server()
    try:
        res = asyncio.run(_measure(port, quick))
        res["metrics"] = _metrics(port)
    finally:
        server.should_exit = True
        svc.scheduler.stop()
        thread.join(10)
    ok, lines = _verdicts(res)
    for ln in lines:
        print(ln)
    return {**res, "pass": bool(ok), "lines": lines}
