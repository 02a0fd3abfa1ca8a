"""The OpenAI wire format: request checks (an APIError naming the field for anything refused),
the reasoning-mode fields, and the response / stream-chunk objects.

Reasoning mode of a chat request, first match wins:
  "mode": "chat" | "think-high" | "think-max"           (v4jax's own field)
  "thinking": {"type": "enabled" | "disabled"}          (DeepSeek's API)
  "reasoning_effort": "none" | "high" | "max"           (OpenAI's field; "none" = non-think)
  otherwise the server's --mode.
"""
from __future__ import annotations

import json
import math
import time

from .. import chat

REASONING_EFFORTS = {"none": "chat", "high": "think-high", "max": "think-max"}
MAX_STOPS = 4


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw.decode("utf-8") if raw else "")
    except UnicodeDecodeError as e:
        raise bad("body", f"the request body is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise bad("body", f"the request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise bad("body", "the request body is JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise bad("body", f"the request body must be a JSON object, got {chat._kind(body)}")
    return body


def _number(body, name, lo, hi, default, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(name, f"'{name}' must be a number, got {chat._kind(v)}")
    if v < lo or (lo_open and v == lo) or v > hi:
        raise bad(name, f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return float(v)


def _int(body, name, lo, default, hi=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(name, f"'{name}' must be an integer, got {chat._kind(v)}")
    if v < lo or (hi is not None and v > hi):
        raise bad(name, f"'{name}' must be {'>= ' + str(lo) if hi is None else f'in [{lo}, {hi}]'}, got {v}")
    return v


def sampling_fields(body: dict) -> dict:
    """temperature, top_p, top_k, seed, stop, n, max_tokens (None: not given) of a request."""
    out = {"temperature": _number(body, "temperature", 0, 2, 1.0),
           "top_p": _number(body, "top_p", 0, 1, 1.0, lo_open=True),
           "seed": _int(body, "seed", -(2 ** 63), None),
           "n": _int(body, "n", 1, 1)}
    k = _int(body, "top_k", -1, 0)
    out["top_k"] = 0 if k == -1 else k  # -1 (vLLM) and 0 both mean off
    if out["n"] != 1:
        raise bad("n", f"'n' must be 1 (one choice per request), got {out['n']}")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad("stop", f"'stop' must be a string or a list of strings, got {chat._kind(stop)}")
    if len(stop) > MAX_STOPS:
        raise bad("stop", f"'stop' takes at most {MAX_STOPS} strings, got {len(stop)}")
    out["stop"] = tuple(s for s in stop if s)
    names = [n for n in ("max_completion_tokens", "max_tokens") if body.get(n) is not None]
    out["max_tokens"] = _int(body, names[0], 1, None) if names else None
    out["max_tokens_field"] = names[0] if names else "max_tokens"
    for name in ("stream",):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise bad(name, f"'{name}' must be a boolean, got {chat._kind(body[name])}")
    opts = body.get("stream_options")
    if opts is not None and not (isinstance(opts, dict) and isinstance(opts.get("include_usage", False), bool)):
        raise bad("stream_options", "'stream_options' must be an object like {\"include_usage\": true}")
    return out


def chat_mode(body: dict, default: str) -> str:
    if body.get("mode") is not None:
        if body["mode"] not in chat.MODES:
            raise bad("mode", f"unknown mode {body['mode']!r}: use one of {', '.join(chat.MODES)}")
        return body["mode"]
    th = body.get("thinking")
    if th is not None:
        kind = th.get("type") if isinstance(th, dict) else None
        if kind not in ("enabled", "disabled"):
            raise bad("thinking", "'thinking' must be {\"type\": \"enabled\"} or {\"type\": \"disabled\"}")
        if kind == "disabled":
            return "chat"
        effort = body.get("reasoning_effort")
        return "think-max" if effort == "max" else "think-high"
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in REASONING_EFFORTS:
            raise bad("reasoning_effort", f"unknown reasoning_effort {effort!r}: use one of "
                      f"{', '.join(REASONING_EFFORTS)}")
        return REASONING_EFFORTS[effort]
    return default


def messages_fields(body: dict) -> tuple[list, list | None]:
    if "messages" not in body:
        raise bad("messages", "'messages' is required")
    msgs, tools = body["messages"], body.get("tools")
    if isinstance(msgs, list) and not msgs:
        raise bad("messages", "'messages' must hold at least one message")
    try:
        chat.check_messages(msgs, tools)
    except ValueError as e:
        raise bad("tools" if str(e).startswith("tools") else "messages", str(e)) from None
    for i, m in enumerate(msgs):
        if isinstance(m.get("content"), list):  # OpenAI content parts: text only
            parts = m["content"]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
                raise bad("messages", f"message {i}: only text content parts are supported")
            msgs[i] = {**m, "content": "".join(p["text"] for p in parts)}
    return msgs, tools


# ---------------------------------------------------------------------------- responses
def usage(done: dict) -> dict:
    return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": done["cached_tokens"]}}


def split_reply(text: str, mode: str, texts) -> dict:
    """The whole completion text -> {"reasoning", "content", "tool_calls"} (as ChatSession.send)."""
    if mode != "chat" and texts.think_end not in text:
        return {"reasoning": text.removeprefix(texts.think_start), "content": "", "tool_calls": []}
    return chat.parse_completion(text, texts)


def openai_tool_calls(calls: list[dict], rid: str) -> list[dict]:
    out = []
    for i, c in enumerate(calls):
        args = c.get("arguments", {})
        out.append({"id": f"call_{rid[:8]}_{i}", "type": "function",
                    "function": {"name": c.get("name", ""),
                                 "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
    return out


def chat_message(done: dict, mode: str, texts, rid: str) -> tuple[dict, str]:
    """(the assistant message, finish_reason) of a finished chat request."""
    msg = split_reply(done["text"], mode, texts)
    out = {"role": "assistant", "content": msg["content"]}
    if msg["reasoning"] is not None:
        out["reasoning_content"] = msg["reasoning"]
    finish = done["finish"]
    if msg["tool_calls"]:
        out["tool_calls"] = openai_tool_calls(msg["tool_calls"], rid)
        finish = "tool_calls" if finish == "stop" else finish
    return out, finish


def envelope(kind: str, rid: str, model: str, created: int, choices: list, **extra) -> dict:
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": choices, **extra}


class StreamSplitter:
    """Incremental reasoning / content deltas of a growing completion text.

    Text that may still become `</think>` or the tool-call block's opening tag is held back; once the
    block opens, content stops (the calls are sent whole at the end)."""

    def __init__(self, mode: str, texts):
        self.mode, self.t = mode, texts
        self.block = f"<{texts.dsml}{texts.tool_calls_block_name}>"
        self.sent_r = self.sent_c = 0

    @staticmethod
    def _safe(text: str, marker: str) -> int:
        """Length of `text` that cannot be the start of `marker`."""
        for k in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:k]):
                return len(text) - k
        return len(text)

    def deltas(self, text: str, final: bool = False) -> list[dict]:
        t = self.t
        text = text.split(t.eos, 1)[0]
        if self.mode != "chat":
            end = text.find(t.think_end)
            if end == -1:
                reasoning = text if final else text[: self._safe(text, t.think_end)]
                rest = ""
            else:
                reasoning, rest = text[:end], text[end + len(t.think_end):]
            reasoning = reasoning.removeprefix(t.think_start)
        else:
            reasoning, rest = "", text
        at = rest.find(self.block)
        content = rest[:at] if at != -1 else (rest if final else rest[: self._safe(rest, self.block)])
        if at != -1 and content.endswith("\n\n"):
            content = content[:-2]
        elif at == -1 and not final:
            content = content.rstrip("\n")  # a blank line may precede a tool-call block (not part of the content)
        out = []
        if len(reasoning) > self.sent_r:
            out.append({"reasoning_content": reasoning[self.sent_r:]})
            self.sent_r = len(reasoning)
        if len(content) > self.sent_c:
            out.append({"content": content[self.sent_c:]})
            self.sent_c = len(content)
        return out


def now() -> int:
    return int(time.time())
