"""infer.py serve: the OpenAI-compatible server, through the official `openai` client.

One in-process server (8 slots, 1024-token context, 32-token prefill chunks) on the tiny FP8 fixture,
every step shape compiled before the first request; greedy replies are checked against
serving.generate (what `infer.py generate` runs), alone and with 8 requests of different lengths in
flight at once; then the prefix cache, quick instructions, bad requests, a client that disconnects,
and one `python infer.py serve` process stopped by SIGTERM in the middle of a stream."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from conftest import fixture_dir
from v4jax import chat
from v4jax.data import ByteTokenizer
from v4jax.engine import Engine
from v4jax.sampling import SamplingConfig
from v4jax.server import protocol as P
from v4jax.server.cli import build
from v4jax.server.scheduler import QueueFull, Request, Scheduler
from v4jax.server.state_cache import StateCache
from v4jax.serving import ChatSession, generate

openai = pytest.importorskip("openai", reason="the openai client is in the test extra: pip install -e '.[test]'")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is a dependency: pip install -e .")

V = "tiny-a-fp8"
CTX, SLOTS, CHUNK = 1024, 8, 32
TOK = ByteTokenizer()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(loaded):
    svc, app = build(loaded[V], TOK, chat.DEFAULT_TEXTS, slots=SLOTS, max_context=CTX, chunk=CHUNK, model_name="tiny")
    warm_shapes = svc.scheduler.slots.compiled_shapes()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    yield {"svc": svc, "url": f"http://127.0.0.1:{port}", "warm_shapes": warm_shapes}
    server.should_exit = True
    th.join(10)
    svc.scheduler.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(loaded):
    """Greedy replies of serving.generate on a batch-1 engine (the path of `infer.py generate`)."""
    eng = Engine(loaded[V], CTX, batch=1, min_bucket=CTX, prefill_chunk=CHUNK, fixed_chunk=True)

    def run(messages, n, mode="chat", tools=None):
        ids = TOK.encode(chat.render(messages, tools, mode))
        eng.reset()
        g = generate(eng, [list(ids)], SamplingConfig(max_new_tokens=n), TOK)["outputs"][0]
        run.tokens = len(g.tokens)
        return g.text, len(ids), g.finish
    run.engine = eng
    return run


def _user(text):
    return [{"role": "user", "content": text}]


def _words(rng, n_chars):
    out = ""
    while len(out) < n_chars:
        out += "".join(chr(c) for c in rng.integers(97, 123, rng.integers(2, 9))) + " "
    return out[:n_chars]


def _stream_text(client, **kw):
    parts, reasoning, usage, finish = [], [], None, None
    for ch in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            parts.append(c.delta.content or "")
            reasoning.append(getattr(c.delta, "reasoning_content", None) or "")
            finish = c.finish_reason or finish
    return "".join(parts), "".join(reasoning), usage, finish


# ---------------------------------------------------------------------------- replies
def test_whole_and_streamed_chat_equal_generate(client, reference):
    msgs = _user("Tell me about sparse attention.")
    want, n_prompt, finish = reference(msgs, 24)
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == want
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    n_new = reference.tokens
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == n_new
    assert r.usage.total_tokens == n_prompt + n_new
    assert r.choices[0].finish_reason == ("length" if finish == "length" else "stop")
    text, _, usage, fin = _stream_text(client, model="tiny", messages=msgs, max_completion_tokens=24, temperature=0)
    assert text == want and fin == r.choices[0].finish_reason
    assert usage.prompt_tokens == n_prompt and usage.completion_tokens == n_new


def test_eight_requests_at_once_equal_generate_and_compile_nothing(served, client, reference):
    rng = np.random.default_rng(3)
    cases = [(_user(_words(rng, int(L))), int(n)) for L, n in zip(rng.integers(5, 400, 8), rng.integers(8, 40, 8))]
    want = [reference(m, n)[0] for m, n in cases]
    got = [None] * len(cases)

    def one(i):
        m, n = cases[i]
        if i % 2:
            got[i] = _stream_text(client, model="tiny", messages=m, max_tokens=n, temperature=0)[0]
        else:
            got[i] = client.chat.completions.create(model="tiny", messages=m, max_tokens=n,
                                                    temperature=0).choices[0].message.content
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert got == want
    assert served["svc"].scheduler.counters["peak_slots_in_use"] >= 4  # they did run side by side
    assert served["svc"].scheduler.slots.compiled_shapes() == served["warm_shapes"]  # no new request compiled


def test_completions_endpoint_is_raw_text(client, reference):
    eng = reference.engine
    eng.reset()
    ids = [0] + list(TOK.encode("def fib(n):"))
    want = generate(eng, [ids], SamplingConfig(max_new_tokens=12), TOK)["outputs"][0].text
    r = client.completions.create(model="tiny", prompt="def fib(n):", max_tokens=12, temperature=0)
    assert r.choices[0].text == want and r.usage.prompt_tokens == len(ids)
    pieces = [c.choices[0].text for c in client.completions.create(model="tiny", prompt="def fib(n):", max_tokens=12,
                                                                    temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == want


def test_stop_string_cuts_the_reply(client, reference):
    msgs = _user("stop strings")
    full, _, _ = reference(msgs, 30)
    stop = next(full[i:i + 2] for i in range(6, len(full) - 2) if full[i:i + 2].isprintable() and full[i:i + 2].strip())
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    text, _, _, fin = _stream_text(client, model="tiny", messages=msgs, max_tokens=30, temperature=0, stop=stop)
    assert text == full[: full.index(stop)] and fin == "stop"


def test_sampling_is_reproducible_from_the_seed(client):
    kw = dict(model="tiny", messages=_user("sample"), max_tokens=16, temperature=1.0, top_p=0.9)
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=8, **kw).choices[0].message.content
    assert a == b and a != c


def test_reasoning_content_is_split_from_content(client, reference):
    msgs = _user("think first")
    want, _, _ = reference(msgs, 20, mode="think-high")
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, temperature=0,
                                       extra_body={"mode": "think-high"})
    expect = P.split_reply(want, "think-high", chat.DEFAULT_TEXTS)
    assert r.choices[0].message.reasoning_content == expect["reasoning"]
    assert r.choices[0].message.content == expect["content"]
    content, reasoning, _, _ = _stream_text(client, model="tiny", messages=msgs, max_tokens=20, temperature=0,
                                            reasoning_effort="high")
    assert (reasoning, content) == (expect["reasoning"], expect["content"])


def test_stream_splitter_and_tool_calls_from_dsml():
    t = chat.DEFAULT_TEXTS
    calls = [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]
    text = "let me look" + t.think_end + "Checking.\n\n" + chat.render_tool_calls(calls, t)
    split = P.StreamSplitter("think-high", t)
    got = [d for i in range(1, len(text) + 1) for d in split.deltas(text[:i])] + split.deltas(text, final=True)
    assert "".join(d.get("reasoning_content", "") for d in got) == "let me look"
    assert "".join(d.get("content", "") for d in got) == "Checking."
    msg, finish = P.chat_message({"text": text, "finish": "stop"}, "think-high", t, "abc")
    assert finish == "tool_calls" and msg["content"] == "Checking." and msg["reasoning_content"] == "let me look"
    (call,) = msg["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "days": 3}


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                                                          "days": {"type": "integer"}}}}}]


def test_tool_call_round_trip(served, client, monkeypatch):
    """The model's DSML comes back as OpenAI tool_calls (whole and streamed); the client's own message
    object, sent back with the tool's result, renders as the V4 chat format says. The tiny random model
    writes no DSML, so its sampled tokens are replaced by a scripted reply (the slot is fed the script)."""
    t = chat.DEFAULT_TEXTS
    reply = "Ok.\n\n" + chat.render_tool_calls([{"name": "get_weather", "arguments": {"days": 2}}], t)
    script = list(TOK.encode(reply)) + [TOK.eos_id]
    sched = served["svc"].scheduler
    real_push = sched._push
    monkeypatch.setattr(sched, "_push", lambda r, tok: real_push(r, script[min(r.count, len(script) - 1)]))
    msgs = _user("Weather in Paris?")
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=len(script) + 5, temperature=0)
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and m.content == "Ok."
    (call,) = m.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"days": 2}
    calls, content, finish = [], "", None
    for ch in client.chat.completions.create(model="tiny", messages=msgs, max_tokens=len(script) + 5,
                                             temperature=0, stream=True):
        for c in ch.choices:
            content += c.delta.content or ""
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert content == "Ok." and finish == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather", {"days": 2})]
    monkeypatch.setattr(sched, "_push", real_push)
    back = msgs + [m.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    r2 = client.chat.completions.create(model="tiny", messages=back, max_tokens=4, temperature=0)
    rendered = chat.render(back)
    assert r2.usage.prompt_tokens == len(TOK.encode(rendered))
    assert chat.render_tool_calls([{"name": "get_weather", "arguments": {"days": 2}}], t) in rendered
    assert "<tool_result>sunny, 21 C</tool_result>" in rendered
    r3 = client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=4, temperature=0)
    assert r3.usage.prompt_tokens == len(TOK.encode(chat.render(msgs, TOOLS)))  # the schemas are in the prompt


# ---------------------------------------------------------------------------- prefix cache, quick instructions
def test_prefix_cache_hit_gives_the_cold_reply(client, reference):
    system = {"role": "system", "content": "You are a careful assistant. " * 10}  # 300 bytes: two 128-blocks
    a = [system] + _user("first question")
    b = [system] + _user("a different question")
    r1 = client.chat.completions.create(model="tiny", messages=a, max_tokens=10, temperature=0)
    r2 = client.chat.completions.create(model="tiny", messages=b, max_tokens=10, temperature=0)
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    sys_end = len(TOK.encode(chat.render([system], add_generation_prompt=False)))
    assert r2.usage.prompt_tokens_details.cached_tokens == sys_end  # the shared system prompt, kept by r1
    assert r2.choices[0].message.content == reference(b, 10)[0]
    r3 = client.chat.completions.create(model="tiny", messages=a, max_tokens=10, temperature=0)
    user_turn = len(TOK.encode(chat.render(a, add_generation_prompt=False)))  # a branch point r1 kept
    assert r3.usage.prompt_tokens_details.cached_tokens == user_turn == r1.usage.prompt_tokens - 2
    assert r3.choices[0].message.content == r1.choices[0].message.content


def test_quick_instruction_forks_the_cached_conversation(served, client, loaded):
    msgs = [{"role": "system", "content": "Answer briefly."}] + _user("What is the capital of France?")
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    conv = msgs + [{"role": "assistant", "content": r.choices[0].message.content}]
    sess = ChatSession(Engine(loaded[V], CTX, batch=1, min_bucket=CTX, prefill_chunk=CHUNK, fixed_chunk=True), TOK)
    sess.messages = list(conv)
    for task, n_task in (("query", 1), ("domain", 1), ("action", 1)):
        q = httpx.post(served["url"] + "/v1/quick_instruction", timeout=120,
                       json={"model": "tiny", "messages": conv if task != "action" else msgs, "task": task}).json()
        if task != "action":
            assert q["answer"] == sess.quick(task)
        assert q["usage"]["prefilled_tokens"] == n_task, q  # only the task token: the branch state was cached
    again = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    assert again.choices[0].message.content == r.choices[0].message.content  # the conversation is unchanged
    bad = httpx.post(served["url"] + "/v1/quick_instruction", json={"messages": conv, "task": "summary"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "task"


def test_state_cache_is_bounded_by_bytes():
    row = lambda n: {"state": [np.zeros(100, np.uint8)], "pos": n, "pend_h": np.zeros(0, np.float32)}  # noqa: E731
    c = StateCache(250)
    assert c.put([1, 2], row(2)) and c.put([1, 2, 3], row(3))
    assert c.longest([1, 2, 3, 4], 3)[1] == 3
    assert c.put([5], row(1))  # evicts the least recently used ([1, 2])
    assert c.bytes == 200 and len(c) == 2 and c.evictions == 1
    assert c.longest([1, 2, 9], 2) == (None, 0)
    assert not c.put([7], {"state": [np.zeros(300, np.uint8)], "pos": 1, "pend_h": np.zeros(0)})
    with pytest.raises(ValueError, match="pos=2"):
        c.put([1], row(2))


# ---------------------------------------------------------------------------- robustness
BAD = [  # (body, status, param)
    (b"{not json", 400, "body"),
    (b"[1, 2]", 400, "body"),
    ({"messages": "hi"}, 400, "messages"),
    ({}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "mode": "think-hard"}, 400, "mode"),
    ({"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "extreme"}, 400, "reasoning_effort"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "top_k": "5"}, 400, "top_k"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x" * 2000}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-5"}, 404, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_request_is_a_4xx_naming_the_field(served, body, status, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(served["url"] + "/v1/chat/completions", timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_the_server_keeps_serving_after_bad_requests(client):
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="tiny", messages=_user("y" * 1500), max_tokens=4)
    r = client.chat.completions.create(model="tiny", messages=_user("still there?"), max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4


def test_a_full_queue_answers_429(served, client):
    sched = served["svc"].scheduler
    bound, sched.max_queue = sched.max_queue, 0
    try:
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="tiny", messages=_user("x"), max_tokens=2)
    finally:
        sched.max_queue = bound
    with pytest.raises(QueueFull):  # the scheduler's own bound, without HTTP
        s = Scheduler(sched.slots, TOK, max_queue=1)
        for _ in range(2):
            s.submit(Request([0, 5], SamplingConfig(max_new_tokens=1), lambda ev: None))


def _metric(url, name):
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_a_client_that_disconnects_frees_its_slot(served):
    url = served["url"]
    before = _metric(url, 'v4jax_requests_total{finish="cancelled"}')
    gen_before = _metric(url, "v4jax_generation_tokens_total")
    body = {"model": "tiny", "messages": _user("a long story"), "max_tokens": 900, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 6:
                break
    end = time.time() + 60
    while _metric(url, "v4jax_slots_in_use") > 0 and time.time() < end:
        time.sleep(0.1)
    assert _metric(url, "v4jax_slots_in_use") == 0
    assert _metric(url, 'v4jax_requests_total{finish="cancelled"}') == before + 1
    assert _metric(url, "v4jax_generation_tokens_total") - gen_before < 900


def test_models_health_and_metrics(served, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(served["url"] + "/health").json() == {"status": "ok"}
    text = httpx.get(served["url"] + "/metrics").text
    for name in ("v4jax_prompt_tokens_total", "v4jax_generation_tokens_total", "v4jax_queue_length",
                 "v4jax_slots_in_use", "v4jax_kv_bytes_in_use", "v4jax_prefix_cache_bytes",
                 "v4jax_generation_tokens_per_second"):
        assert f"# TYPE {name} " in text
    assert _metric(served["url"], "v4jax_slots_total") == SLOTS


# ---------------------------------------------------------------------------- the command
def test_infer_serve_answers_openai_and_drains_on_sigterm(tmp_path):
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "infer.py", "serve", "--checkpoint", fixture_dir(V), "--port", str(port),
                             "--slots", "2", "--max-context", "512", "--chunk", "32", "--log-level", "warning"],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        end = time.time() + 240
        while time.time() < end:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="tiny-a-fp8", messages=_user("hello"), max_tokens=5, temperature=0)
        assert r.usage.completion_tokens == 5
        chunks, finish = 0, None
        for ch in c.chat.completions.create(model="tiny-a-fp8", messages=_user("count"), max_tokens=200,
                                            temperature=0, stream=True):
            chunks += 1
            if chunks == 3:
                proc.send_signal(signal.SIGTERM)  # in mid-stream: the reply still finishes
            if ch.choices and ch.choices[0].finish_reason:
                finish = ch.choices[0].finish_reason
        assert finish in ("length", "stop") and chunks > 3
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert "ready in" in (tmp_path / "serve.log").read_text()


@pytest.mark.parametrize("argv,needle", [
    (["--slots", "0"], "--slots must be >= 1"),
    (["--chunk", "8"], "--chunk must be >= 16"),
    (["--mode", "fast"], "unknown mode 'fast'"),
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--prefix-cache-mb", "-1"], "--prefix-cache-mb must be >= 0"),
])
def test_serve_refuses_bad_options_in_one_line(argv, needle, capsys):
    import infer

    assert infer.main(["serve", "--checkpoint", fixture_dir(V), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_serve_refuses_a_missing_checkpoint(tmp_path, capsys):
    import infer

    assert infer.main(["serve", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_slots_on_a_data_mesh_with_the_fp8_state_equal_generate():
    """Slots with the batch split over a data axis and the FP8 decode state: a chunked one-row prefill beside another
    slot's decode gives serving.generate's greedy tokens (batch-1 engine, same model and layout)."""
    from v4jax import checkpoint
    from v4jax.server.slots import Slots
    from v4jax.sharding import make_mesh

    model = checkpoint.load_hub(fixture_dir(V), mesh=make_mesh("data=2"))
    slots = Slots(model, 512, 4, kv_layout="fp8", chunk=16)
    slots.warm()
    shapes = slots.compiled_shapes()
    prompt = [int(t) for t in np.random.default_rng(0).integers(2, 200, 45)]
    eng = Engine(model, 512, batch=1, min_bucket=512, prefill_chunk=16, fixed_chunk=True, kv_layout="fp8")
    want = generate(eng, [prompt], SamplingConfig(max_new_tokens=10, stop_on_eos=False))["outputs"][0].tokens
    greedy = (0, 0, 0.0, 0, 1.0)
    slots.prefill_row(0, [7, 8, 9], greedy)
    for i in range(0, len(prompt), 16):  # 16 + 16 + 13 tokens
        out = [slots.prefill_row(2, prompt[i: i + 16], greedy)]
    while len(out) < 10:
        nxt = slots.step({2: [out[-1]], 0: [5]}, {2: (0, len(out), 0.0, 0, 1.0), 0: greedy})
        out.append(int(nxt[2]))
    assert out == want
    assert slots.compiled_shapes() == shapes
    assert list(slots.pos) == [3 + 9, 0, 45 + 9, 0]


def test_shutdown_ends_open_streams_with_an_error_event(served, client):
    """Last of the module (it stops the shared server's scheduler): draining refuses new requests with
    503 and keeps serving what is in a slot; stopping ends an open stream with a final error event,
    which the openai client raises as an APIError instead of hanging."""
    sched = served["svc"].scheduler
    stream = client.chat.completions.create(model="tiny", messages=_user("go on"), max_tokens=900, temperature=0,
                                            stream=True)
    it = iter(stream)
    for _ in range(3):
        next(it)
    sched.drain()
    assert httpx.get(served["url"] + "/health").status_code == 503
    with pytest.raises(openai.InternalServerError, match="shutting down"):
        client.chat.completions.create(model="tiny", messages=_user("x"), max_tokens=2)
    next(it)  # the stream in its slot still runs
    sched.stop()
    with pytest.raises(openai.APIError, match="shut down"):
        for _ in it:
            pass
