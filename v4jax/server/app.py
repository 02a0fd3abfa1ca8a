"""The HTTP layer (FastAPI): OpenAI's chat and text completions, the quick-instruction extension,
models, health and Prometheus metrics, over one `Service` (the scheduler and what requests need).

  POST /v1/chat/completions   messages, tools, mode / thinking / reasoning_effort, max_tokens or
                              max_completion_tokens, temperature, top_p, top_k, seed, stop, n = 1,
                              stream, stream_options.include_usage
  POST /v1/completions        prompt (raw text, BOS added), the same sampling fields
  POST /v1/quick_instruction  {messages, tools?, mode?, task: title|query|action|domain|authority|read_url,
                              url?, max_tokens?} -> {"answer", "usage": {..., "cached_tokens",
                              "prefilled_tokens"}}: answered from a fork of the conversation's cached state
  GET  /v1/models, /health, /metrics

Every refused request is a JSON {"error": {"message", "type", "param", "code"}} with a 4xx status;
nothing a client sends stops the server.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .. import chat
from ..sampling import SamplingConfig
from . import protocol as P
from .scheduler import Draining, QueueFull, Request, Scheduler

QUICK_MAX_TOKENS = 256


@dataclasses.dataclass
class Service:
    scheduler: Scheduler
    tokenizer: object
    texts: chat.PromptTexts
    model_name: str
    max_context: int
    mode: str = "chat"
    default_max_tokens: int = 1024
    created: int = dataclasses.field(default_factory=P.now)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]


class _Channel:
    """Scheduler events (another thread) -> an asyncio queue on the request's loop."""

    def __init__(self):
        self.loop, self.q = asyncio.get_running_loop(), asyncio.Queue()

    def __call__(self, event: dict) -> None:
        try:
            self.loop.call_soon_threadsafe(self.q.put_nowait, event)
        except RuntimeError:  # the loop is gone (shutdown): nobody is listening
            pass


def _sampling(svc: Service, sf: dict, n_prompt: int, greedy: bool = False) -> SamplingConfig:
    if n_prompt >= svc.max_context:
        raise P.bad("messages" if sf.get("_chat") else "prompt",
                    f"the prompt has {n_prompt} tokens; this server's context is {svc.max_context} tokens "
                    "(prompt and reply together)", code="context_length_exceeded")
    room = svc.max_context - n_prompt
    n = sf["max_tokens"]
    if n is None:
        n = min(svc.default_max_tokens, room)
    elif n > room:
        raise P.bad(sf["max_tokens_field"], f"'{sf['max_tokens_field']}' is {n}, but the prompt's {n_prompt} tokens "
                    f"leave {room} of this server's {svc.max_context}-token context", code="context_length_exceeded")
    seed = sf["seed"] if sf["seed"] is not None else secrets.randbits(32)
    return SamplingConfig(temperature=0.0 if greedy else sf["temperature"], top_k=sf["top_k"], top_p=sf["top_p"],
                          seed=seed & 0xFFFFFFFF, max_new_tokens=n, stop_strings=sf["stop"])


def _submit(svc: Service, ids, sampling, **kw) -> tuple[Request, _Channel]:
    ch = _Channel()
    req = Request(list(ids), sampling, ch, **kw)
    try:
        svc.scheduler.submit(req)
    except QueueFull as e:
        raise P.APIError(429, str(e), type="rate_limit_error", code="queue_full") from None
    except Draining as e:
        raise P.APIError(503, str(e), type="server_error", code="shutting_down") from None
    return req, ch


async def _wait_done(svc: Service, http: HTTPRequest, req: Request, ch: _Channel) -> dict:
    """The request's done event (a client that went away cancels it; an error event raises)."""
    try:
        while True:
            try:
                ev = await asyncio.wait_for(ch.q.get(), 0.5)
            except TimeoutError:
                if await http.is_disconnected():
                    svc.scheduler.cancel(req)
                    raise P.APIError(499, "the client closed the connection", type="client_closed") from None
                continue
            if ev["type"] == "done":
                return ev
            if ev["type"] == "error":
                raise P.APIError(ev["status"], ev["message"], type="server_error")
    except asyncio.CancelledError:
        svc.scheduler.cancel(req)
        raise


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(svc: Service, req: Request, ch: _Channel, kind: str, rid: str, model: str, make_delta, finish_fn,
                  include_usage: bool):
    """SSE chunks of one request; a client that disconnects cancels it (its slot is freed)."""
    finished = False
    created = P.now()
    try:
        if kind == "chat.completion.chunk":
            yield _sse(P.envelope(kind, rid, model, created, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                                 "finish_reason": None}]))
        text = ""
        while True:
            ev = await ch.q.get()
            if ev["type"] == "error":
                finished = True
                yield _sse({"error": {"message": ev["message"], "type": "server_error", "param": None,
                                      "code": "shutting_down" if ev["status"] == 503 else None}})
                break
            final = ev["type"] == "done"
            text = ev["text"] if final else text + ev["text"]
            for d in make_delta(text, final):
                yield _sse(P.envelope(kind, rid, model, created, [{"index": 0, **d, "finish_reason": None}]))
            if final:
                finished = True
                extra, finish = finish_fn(ev)
                yield _sse(P.envelope(kind, rid, model, created, [{"index": 0, **extra, "finish_reason": finish}]))
                if include_usage:
                    yield _sse(P.envelope(kind, rid, model, created, [], usage=P.usage(ev)))
                break
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            svc.scheduler.cancel(req)


def _check_model(svc: Service, body: dict) -> str:
    m = body.get("model")
    if m is not None and m != svc.model_name:
        raise P.APIError(404, f"the model {m!r} is not served here; this server serves {svc.model_name!r}",
                         param="model", code="model_not_found")
    return svc.model_name


def branch_points(svc: Service, msgs, tools, mode, ids) -> tuple[int, ...]:
    """Prompt lengths whose states the prefix cache keeps besides the aligned ones: the end of the
    leading system message (shared by every conversation that starts with it), and the points quick
    instructions on this conversation fork from (chat.quick_instruction_prompt): the end of the last
    user turn, the whole prompt (action) and the first reply's end (title)."""
    pts = {len(ids)}
    cands = []
    if msgs[0].get("role") == "system" and len(msgs) > 1:
        cands.append(chat.render(msgs[:1], tools, mode, svc.texts, add_generation_prompt=False))
    last = max((i for i, m in enumerate(msgs) if m.get("role") in ("user", "developer")), default=None)
    if last is not None:
        cands.append(chat.render(msgs[:last + 1], tools, mode, svc.texts, add_generation_prompt=False))
    first = next((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), None)
    if first is not None:
        cands.append(chat.render(msgs[:first + 1], tools, mode, svc.texts))
    for text in cands:
        b = svc.encode(text)
        if 0 < len(b) <= len(ids) and ids[: len(b)] == b:
            pts.add(len(b))
    return tuple(sorted(pts))


async def chat_completions(svc: Service, http: HTTPRequest):
    """POST /v1/chat/completions."""
    body = P.parse_json(await http.body())
    model = _check_model(svc, body)
    msgs, tools = P.messages_fields(body)
    mode = P.chat_mode(body, svc.mode)
    sf = {**P.sampling_fields(body), "_chat": True}
    try:
        ids = svc.encode(chat.render(msgs, tools, mode, svc.texts))
    except ValueError as e:
        raise P.bad("messages", str(e)) from None
    req, ch = _submit(svc, ids, _sampling(svc, sf, len(ids)), save_at=branch_points(svc, msgs, tools, mode, ids))
    rid = "chatcmpl-" + req.id
    if body.get("stream"):
        split = P.StreamSplitter(mode, svc.texts)

        def finish(ev):
            msg, reason = P.chat_message(ev, mode, svc.texts, req.id)
            return ({"delta": {"tool_calls": [{"index": i, **c} for i, c in enumerate(msg["tool_calls"])]}}
                    if msg.get("tool_calls") else {"delta": {}}), reason

        def delta(text, final):
            return [{"delta": d} for d in split.deltas(text, final)]

        include = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(_stream(svc, req, ch, "chat.completion.chunk", rid, model, delta, finish, include),
                                 media_type="text/event-stream")
    done = await _wait_done(svc, http, req, ch)
    msg, reason = P.chat_message(done, mode, svc.texts, req.id)
    return P.envelope("chat.completion", rid, model, P.now(),
                      [{"index": 0, "message": msg, "finish_reason": reason, "logprobs": None}],
                      usage=P.usage(done))


async def completions(svc: Service, http: HTTPRequest):
    """POST /v1/completions: a raw prompt (BOS added)."""
    body = P.parse_json(await http.body())
    model = _check_model(svc, body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise P.bad("prompt", f"'prompt' must be a string, got {chat._kind(prompt)}")
    sf = P.sampling_fields(body)
    ids = svc.encode(prompt)
    bos = svc.scheduler.slots.cfg.bos_token_id
    ids = ids if ids and ids[0] == bos else [bos] + ids
    req, ch = _submit(svc, ids, _sampling(svc, sf, len(ids)))
    rid = "cmpl-" + req.id
    if body.get("stream"):
        sent = [0]

        def delta(text, final):
            piece, sent[0] = text[sent[0]:], len(text)
            return [{"text": piece}] if piece else []

        include = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(_stream(svc, req, ch, "text_completion", rid, model, delta,
                                         lambda ev: ({"text": ""}, ev["finish"]), include),
                                 media_type="text/event-stream")
    done = await _wait_done(svc, http, req, ch)
    return P.envelope("text_completion", rid, model, P.now(),
                      [{"index": 0, "text": done["text"], "finish_reason": done["finish"], "logprobs": None}],
                      usage=P.usage(done))


async def quick_instruction(svc: Service, http: HTTPRequest):
    """POST /v1/quick_instruction: a task answered greedily from a fork of the conversation's cached state."""
    body = P.parse_json(await http.body())
    model = _check_model(svc, body)
    msgs, tools = P.messages_fields(body)
    mode = P.chat_mode(body, svc.mode)
    task, url = body.get("task"), body.get("url")
    if task not in chat.TASKS:
        raise P.bad("task", f"unknown task {task!r}: use one of {', '.join(chat.TASKS)}")
    if url is not None and not isinstance(url, str):
        raise P.bad("url", f"'url' must be a string, got {chat._kind(url)}")
    n = P._int(body, "max_tokens", 1, 32, hi=QUICK_MAX_TOKENS)
    try:
        prefix, suffix = chat.quick_instruction_prompt(task, msgs, mode, svc.texts, url=url, tools=tools)
    except ValueError as e:
        raise P.bad("url" if "url" in str(e) else "messages", str(e)) from None
    ids = svc.encode(prefix) + svc.encode(suffix)
    sf = {"max_tokens": n, "max_tokens_field": "max_tokens", "seed": 0, "temperature": 0.0, "top_k": 0,
          "top_p": 1.0, "stop": (), "_chat": True}
    req, ch = _submit(svc, ids, _sampling(svc, sf, len(ids), greedy=True), store=False)
    done = await _wait_done(svc, http, req, ch)
    use = P.usage(done)
    use["prefilled_tokens"] = done["prompt_tokens"] - done["cached_tokens"]
    return {"id": "qi-" + req.id, "object": "quick_instruction", "created": P.now(), "model": model, "task": task,
            "answer": done["text"].strip(), "finish_reason": done["finish"], "usage": use}


def create_app(svc: Service) -> FastAPI:
    app = FastAPI(title="v4jax", version="0.1.0")

    @app.exception_handler(P.APIError)
    async def _api_error(_, e: P.APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_, e: HTTPException):
        return JSONResponse({"error": {"message": str(e.detail), "type": "invalid_request_error", "param": None,
                                       "code": None}}, status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e: RequestValidationError):
        return JSONResponse(P.bad("body", str(e)).body(), status_code=400)

    @app.post("/v1/chat/completions")
    async def _chat(http: HTTPRequest):
        return await chat_completions(svc, http)

    @app.post("/v1/completions")
    async def _completions(http: HTTPRequest):
        return await completions(svc, http)

    @app.post("/v1/quick_instruction")
    async def _quick(http: HTTPRequest):
        return await quick_instruction(svc, http)

    @app.get("/v1/models")
    async def _models():
        return {"object": "list", "data": [{"id": svc.model_name, "object": "model", "created": svc.created,
                                            "owned_by": "v4jax", "max_model_len": svc.max_context}]}

    @app.get("/health")
    async def _health():
        if svc.scheduler.draining or svc.scheduler.stopped:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def _metrics():
        return PlainTextResponse(prometheus(svc), media_type="text/plain; version=0.0.4")

    return app


_METRICS = (  # name, type, help, stats key
    ("v4jax_prompt_tokens_total", "counter", "Prompt tokens of admitted requests", "prompt_tokens"),
    ("v4jax_cached_tokens_total", "counter", "Prompt tokens restored from the prefix cache", "cached_tokens"),
    ("v4jax_generation_tokens_total", "counter", "Tokens generated", "generated_tokens"),
    ("v4jax_steps_total", "counter", "Mixed decode / prefill steps run", "steps"),
    ("v4jax_generation_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s", "tokens_per_s"),
    ("v4jax_queue_length", "gauge", "Requests waiting for a slot", "queue"),
    ("v4jax_slots_in_use", "gauge", "Decode slots holding a request", "slots_in_use"),
    ("v4jax_slots_total", "gauge", "Decode slots", "slots"),
    ("v4jax_kv_bytes_in_use", "gauge", "Decode-state bytes the requests in slots fill", "kv_bytes_in_use"),
)


def prometheus(svc: Service) -> str:
    st = svc.scheduler.stats()
    lines = ["# HELP v4jax_requests_total Requests answered, by how they ended", "# TYPE v4jax_requests_total counter"]
    for end in ("stop", "length", "cancelled", "error"):
        lines.append(f'v4jax_requests_total{{finish="{end}"}} {st.get("requests_" + end, 0)}')
    for name, kind, text, key in _METRICS:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {st.get(key, 0)}"]
    cache = svc.scheduler.cache
    if cache is not None:
        for name, kind, text, value in (
                ("v4jax_prefix_cache_bytes", "gauge", "Host bytes the prefix cache holds", cache.bytes),
                ("v4jax_prefix_cache_entries", "gauge", "Prefix states held", len(cache)),
                ("v4jax_prefix_cache_hits_total", "counter", "Requests that started from a cached prefix", cache.hits),
                ("v4jax_prefix_cache_evictions_total", "counter", "States dropped for room", cache.evictions)):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"
