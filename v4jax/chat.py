"""DeepSeek-V4 chat encoding: conversation -> prompt string, completion -> message, quick instructions.

V4 ships no Jinja chat template; the format is defined by code (spec §13.1, §13.3)::

    BOS [think-max block] system text ["\n\n" tools section] <｜latest_reminder｜>metadata
    <｜User｜>text (tool results merged in as <tool_result>…</tool_result>, parts joined by "\n\n")
    <｜Assistant｜><think> | <｜Assistant｜></think>          generation prefix, emitted by the user turn
    reasoning</think>answer["\n\n" DSML tool-calls block]EOS    assistant turn

* ``developer`` renders like a user turn, with its tools section; ``tool`` messages (and a user message
  right after them) join one user turn, tool results reordered to the call order of the latest assistant
  ``tool_calls`` (matched by ``tool_call_id``).
* A user/developer turn followed by an assistant/latest_reminder message, or ending the conversation
  (``add_generation_prompt``), emits the generation prefix; a final assistant message is complete.
* Thinking modes drop the reasoning of assistant turns before the last user/developer turn (they open
  with ``</think>``; developer turns before it are removed) unless any message defines tools
  (interleaved thinking). Chat mode never renders reasoning. ``think-max`` puts the
  ``reasoning_effort_max`` block right after BOS.
* A message with a ``task`` key (quick instruction) is followed by its task token instead of the
  generation prefix (``action``: after ``<｜Assistant｜>`` + think prefix); the reply after it has no
  reasoning.

The prose blocks (tools section, think-max instruction) are v4jax's own wording. The released model was
trained with the official texts: load them with :func:`load_prompt_texts` from the model repository
(``encoding/encoding_dsv4.py`` is parsed, never executed) or from a JSON file of its constants.
"""
from __future__ import annotations

import ast
import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODES = ("chat", "think-high", "think-max")
TASKS = ("action", "query", "authority", "domain", "title", "read_url")
ROLES = ("system", "user", "developer", "assistant", "tool", "latest_reminder")

_V4JAX_TOOLS_TEMPLATE = """## Tools

The tools below are available. To use them, reply with one <{dsml_token}tool_calls> block shaped like this:

<{dsml_token}tool_calls>
<{dsml_token}invoke name="TOOL_NAME">
<{dsml_token}parameter name="PARAM_NAME" string="true|false">VALUE</{dsml_token}parameter>
</{dsml_token}invoke>
</{dsml_token}tool_calls>

Several invoke elements may share one block. Mark plain string values with string="true" and write them \
verbatim; write every other value (number, boolean, array, object) as JSON with string="false".

In thinking mode (the reply opens with {thinking_start_token}) finish your reasoning and close it with \
{thinking_end_token} before any tool call or answer; otherwise start right after {thinking_end_token}.

### Tool Schemas

{tool_schemas}

Call only the tools listed above, with exactly the parameters their schemas define.
"""

_V4JAX_REASONING_EFFORT_MAX = (
    "Reasoning effort: maximum.\n"
    "Work through the problem completely before answering: split it into parts, check each step, "
    "weigh alternatives and edge cases, and verify the final result instead of assuming it.\n\n"
)


def _default_task_tokens() -> dict[str, str]:
    return {task: f"<｜{task}｜>" for task in TASKS}


@dataclass(frozen=True)
class PromptTexts:
    """Special-token strings and fixed text blocks of the V4 prompt format.

    ``tools_template`` is a ``str.format`` template with the fields ``{dsml_token}``,
    ``{thinking_start_token}``, ``{thinking_end_token}`` and ``{tool_schemas}`` (one JSON schema a line).
    ``tool_calls_template`` uses ``{dsml_token}``, ``{tc_block_name}``, ``{tool_calls}`` and
    ``tool_call_template`` uses ``{dsml_token}``, ``{name}``, ``{arguments}``.
    """

    bos: str = "<｜begin▁of▁sentence｜>"
    eos: str = "<｜end▁of▁sentence｜>"
    user: str = "<｜User｜>"
    assistant: str = "<｜Assistant｜>"
    latest_reminder: str = "<｜latest_reminder｜>"
    think_start: str = "<think>"
    think_end: str = "</think>"
    dsml: str = "｜DSML｜"
    task_tokens: dict = field(default_factory=_default_task_tokens)
    extracted_url: str = "<｜extracted_url｜>"
    tool_calls_block_name: str = "tool_calls"
    tool_calls_template: str = "<{dsml_token}{tc_block_name}>\n{tool_calls}\n</{dsml_token}{tc_block_name}>"
    tool_call_template: str = '<{dsml_token}invoke name="{name}">\n{arguments}\n</{dsml_token}invoke>'
    tool_result_template: str = "<tool_result>{content}</tool_result>"
    tools_template: str = _V4JAX_TOOLS_TEMPLATE
    reasoning_effort_max: str = _V4JAX_REASONING_EFFORT_MAX


DEFAULT_TEXTS = PromptTexts()

# Names of the module-level constants in the official encoder (and keys of official_constants.json).
SOURCE_KEYS = {
    "bos_token": "bos", "eos_token": "eos", "USER_SP_TOKEN": "user", "ASSISTANT_SP_TOKEN": "assistant",
    "LATEST_REMINDER_SP_TOKEN": "latest_reminder", "thinking_start_token": "think_start",
    "thinking_end_token": "think_end", "dsml_token": "dsml", "DS_TASK_SP_TOKENS": "task_tokens",
    "tool_calls_block_name": "tool_calls_block_name", "tool_calls_template": "tool_calls_template",
    "tool_call_template": "tool_call_template", "tool_output_template": "tool_result_template",
    "TOOLS_TEMPLATE": "tools_template", "REASONING_EFFORT_MAX": "reasoning_effort_max",
}


# ----------------------------------------------------------------------------- loading texts
def _locate_source(path: Path) -> Path:
    """The constants file for ``path``: the file itself, or ``encoding_dsv4.py`` inside a model repo."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"prompt texts source {path} does not exist")
    for candidate in (path / "encoding" / "encoding_dsv4.py", path / "encoding_dsv4.py"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no encoding/encoding_dsv4.py or encoding_dsv4.py in {path}")


def _literal_constants(source: Path) -> dict[str, Any]:
    """Module-level ``NAME = <literal>`` assignments of a Python file, read with ``ast`` (never run)."""
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    except SyntaxError as exc:  # a NUL byte is one too
        raise ValueError(f"{source}: not valid Python ({f'line {exc.lineno}: ' if exc.lineno else ''}"
                         f"{exc.msg})") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise ValueError(f"{source}: not readable Python source ({type(exc).__name__})") from None
    values: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and node.value is not None and isinstance(node.target, ast.Name):
            names = [node.target.id]
        else:
            continue
        try:
            value = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue  # not a plain literal (calls, name references, concatenations with names)
        values.update(dict.fromkeys(names, value))
    return values


def load_prompt_texts(path: str | Path) -> PromptTexts:
    """Read the official prompt texts from a JSON file, an ``encoding_dsv4.py`` file or a model repository.

    Keys are the official constant names (``SOURCE_KEYS``); keys that are absent keep v4jax's defaults.
    Python files are parsed with ``ast`` and only literal assignments are evaluated. Raises ``ValueError``
    when the file holds none of the known constants or a constant has the wrong type.
    """
    source = _locate_source(Path(path))
    if source.suffix == ".json":
        try:
            values = json.loads(source.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{source}: not valid UTF-8 JSON ({exc})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{source}: expected a JSON object of prompt constants")
    else:
        values = _literal_constants(source)
    found = {SOURCE_KEYS[k]: v for k, v in values.items() if k in SOURCE_KEYS}
    if not found:
        raise ValueError(f"{source}: none of the prompt constants {sorted(SOURCE_KEYS)} were found")
    for key, value in found.items():
        ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values()) \
            if key == "task_tokens" else isinstance(value, str)
        if not ok:
            raise ValueError(f"{source}: constant for {key!r} has an unexpected type {type(value).__name__}")
    if "task_tokens" in found:
        found["task_tokens"] = {**_default_task_tokens(), **found["task_tokens"]}
    return PromptTexts(**found)


# ----------------------------------------------------------------------------- small helpers
def _is_thinking(mode: str) -> bool:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    return mode != "chat"


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")


def _to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def mode_generation_prefix(mode: str, texts: PromptTexts | None = None) -> str:
    """The generation prompt for ``mode``: ``<｜Assistant｜><think>`` (thinking) or ``<｜Assistant｜></think>``."""
    t = texts or DEFAULT_TEXTS
    return t.assistant + (t.think_start if _is_thinking(mode) else t.think_end)


def quick_instruction_suffix(task: str, texts: PromptTexts | None = None, url: str | None = None) -> str:
    """Task tokens appended at a quick-instruction branch point (``read_url`` needs ``url``)."""
    _check_task(task)
    t = texts or DEFAULT_TEXTS
    if task == "read_url":
        if not url:
            raise ValueError("task 'read_url' needs the url to check")
        return t.extracted_url + url + t.task_tokens["read_url"]
    return t.task_tokens[task]


def render_tools_section(tools: list[dict], texts: PromptTexts | None = None) -> str:
    """The tools section: ``tools_template`` with one JSON schema per line (OpenAI or bare function form)."""
    t = texts or DEFAULT_TEXTS
    schemas = "\n".join(_to_json(tool.get("function", tool)) for tool in tools)
    return t.tools_template.format(tool_schemas=schemas, dsml_token=t.dsml,
                                   thinking_start_token=t.think_start, thinking_end_token=t.think_end)


def _call_parts(call: dict) -> tuple[str, dict]:
    """(name, arguments dict) of a tool call in OpenAI form or ``{"name", "arguments"}`` form."""
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            args = {"arguments": args}
    if not isinstance(args, dict):
        args = {"arguments": args}
    return fn.get("name", ""), args


def render_tool_calls(calls: list[dict], texts: PromptTexts | None = None) -> str:
    """The DSML tool-calls block: strings are written raw (``string="true"``), other values as JSON."""
    t = texts or DEFAULT_TEXTS
    invokes = []
    for call in calls:
        name, args = _call_parts(call)
        params = "\n".join(
            f'<{t.dsml}parameter name="{key}" string="{"true" if isinstance(v, str) else "false"}">'
            f'{v if isinstance(v, str) else _to_json(v)}</{t.dsml}parameter>' for key, v in args.items())
        invokes.append(t.tool_call_template.format(dsml_token=t.dsml, name=name, arguments=params))
    return t.tool_calls_template.format(dsml_token=t.dsml, tc_block_name=t.tool_calls_block_name,
                                        tool_calls="\n".join(invokes))


# ----------------------------------------------------------------------------- preprocessing
_TEXT_KEYS = ("content", "reasoning_content", "url")  # a string (or null) wherever they appear


def _kind(value: Any) -> str:
    """The JSON name of a value's type, for messages about JSON input."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def check_messages(messages: Any, tools: Any = None) -> None:
    """ValueError naming the message (by index) and key when ``messages`` is not a list of message
    objects with known roles and string texts, or ``tools`` is not a list of objects."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of message objects, got {_kind(messages)}")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"message {i} must be an object with 'role' and 'content', got {_kind(msg)}")
        if msg.get("role") not in ROLES:
            raise ValueError(f"message {i}: unknown role {msg.get('role')!r}; valid roles: {', '.join(ROLES)}")
        for key in _TEXT_KEYS:
            ok = msg.get(key) is None or isinstance(msg[key], str) or (key == "content" and msg["role"] == "tool")
            if not ok:
                raise ValueError(f"message {i}: '{key}' must be a string, got {_kind(msg[key])}")
        calls = msg.get("tool_calls")
        if calls is not None and not (isinstance(calls, list) and all(isinstance(c, dict) for c in calls)):
            raise ValueError(f"message {i}: 'tool_calls' must be a list of objects")
        if msg.get("tools") is not None:
            _check_tools(msg["tools"], f"message {i}: 'tools'")
    if tools is not None:
        _check_tools(tools, "tools")


def _check_tools(tools: Any, what: str) -> None:
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError(f"{what} must be a list of tool objects")


def _prepare(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Deep-copy, check roles, attach ``tools`` to a leading system/developer message (or a new system)."""
    check_messages(messages, tools)
    msgs = copy.deepcopy(list(messages))
    if tools:
        if msgs and msgs[0]["role"] in ("system", "developer"):
            msgs[0]["tools"] = list(msgs[0].get("tools") or []) + list(tools)
        else:
            msgs.insert(0, {"role": "system", "content": "", "tools": list(tools)})
    return msgs


def _tool_text(content: Any) -> str:
    """Text of a tool result: strings as is, lists of text blocks joined by blank lines, else JSON."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in content):
        return "\n\n".join(b.get("text", "") for b in content)
    return _to_json(content)


def _merge_turns(msgs: list[dict]) -> list[dict]:
    """Fold tool messages (and user messages following them) into user turns with ``parts``.

    A part is ``(kind, call_id, text)`` with kind "text" or "tool". A tool message joins the previous
    user turn; a user message joins it unless that turn carries a task.
    """
    turns: list[dict] = []
    for msg in msgs:
        prev = turns[-1] if turns and turns[-1]["role"] == "user" else None
        if msg["role"] == "tool":
            part = ("tool", msg.get("tool_call_id") or "", _tool_text(msg.get("content")))
            if prev is not None:
                prev["parts"].append(part)
            else:
                turns.append({"role": "user", "parts": [part]})
        elif msg["role"] == "user":
            part = ("text", "", msg.get("content") or "")
            if prev is not None and prev.get("task") is None:
                prev["parts"].append(part)
            else:
                turns.append({**{k: msg[k] for k in ("task", "url", "wo_eos") if k in msg},
                              "role": "user", "parts": [part]})
        else:
            turns.append(msg)
    return turns


def _sort_tool_results(turns: list[dict]) -> None:
    """Reorder tool results inside each user turn to the call order of the latest assistant tool calls."""
    order: dict[str, int] = {}
    for turn in turns:
        if turn["role"] == "assistant" and turn.get("tool_calls"):
            order = {cid: i for i, call in enumerate(turn["tool_calls"])
                     if (cid := call.get("id") or call.get("function", {}).get("id", ""))}
        elif turn["role"] == "user" and order:
            slots = [i for i, part in enumerate(turn["parts"]) if part[0] == "tool"]
            if len(slots) > 1:
                ordered = sorted((turn["parts"][i] for i in slots), key=lambda p: order.get(p[1], 0))
                for i, part in zip(slots, ordered):
                    turn["parts"][i] = part


def _last_user_index(turns: list[dict]) -> int:
    return max((i for i, t in enumerate(turns) if t["role"] in ("user", "developer")), default=-1)


def _drop_old_reasoning(turns: list[dict]) -> list[dict]:
    """Before the last user turn: strip assistant reasoning and remove developer turns."""
    last = _last_user_index(turns)
    kept = []
    for i, turn in enumerate(turns):
        if i >= last or turn["role"] in ("user", "system", "latest_reminder"):
            kept.append(turn)
        elif turn["role"] == "assistant":
            kept.append({k: v for k, v in turn.items() if k != "reasoning_content"})
    return kept


# ----------------------------------------------------------------------------- rendering
def _with_tools(content: str, msg: dict, t: PromptTexts) -> str:
    return content + ("\n\n" + render_tools_section(msg["tools"], t) if msg.get("tools") else "")


def _render_body(i: int, turns: list[dict], opens_reasoning: bool, t: PromptTexts) -> str:
    """The text of turn ``i`` itself (without the transition that follows it)."""
    msg = turns[i]
    role = msg["role"]
    if role == "system":
        return _with_tools(msg.get("content") or "", msg, t)
    if role == "developer":
        return t.user + _with_tools(msg.get("content") or "", msg, t)
    if role == "user":
        return t.user + "\n\n".join(
            t.tool_result_template.format(content=text) if kind == "tool" else text
            for kind, _, text in msg["parts"])
    if role == "latest_reminder":
        return t.latest_reminder + (msg.get("content") or "")
    head = ""
    if opens_reasoning and not (i > 0 and turns[i - 1].get("task") is not None):
        head = (msg.get("reasoning_content") or "") + t.think_end
    calls = msg.get("tool_calls") or []
    block = "\n\n" + render_tool_calls(calls, t) if calls else ""
    return head + (msg.get("content") or "") + block + ("" if msg.get("wo_eos") else t.eos)


def _render_transition(i: int, turns: list[dict], thinking: bool, opens_reasoning: bool,
                       t: PromptTexts, add_generation_prompt: bool) -> str:
    """What follows turn ``i``: its task tokens, the generation prefix, or nothing."""
    msg = turns[i]
    next_role = turns[i + 1]["role"] if i + 1 < len(turns) else None
    if next_role not in (None, "assistant", "latest_reminder"):
        return ""
    task = msg.get("task")
    if task is not None:
        _check_task(task)
        if task == "action":
            return t.assistant + (t.think_start if thinking else t.think_end) + t.task_tokens["action"]
        if task == "read_url" and msg.get("url"):
            return quick_instruction_suffix(task, t, msg["url"])
        return t.task_tokens[task]
    if msg["role"] not in ("user", "developer") or (next_role is None and not add_generation_prompt):
        return ""
    return t.assistant + (t.think_start if opens_reasoning else t.think_end)


def render(messages: list[dict], tools: list[dict] | None = None, mode: str = "chat",
           texts: PromptTexts | None = None, add_generation_prompt: bool = True) -> str:
    """Render a conversation (OpenAI-style message dicts) to the V4 prompt string, BOS included.

    ``mode``: "chat" (non-think), "think-high" or "think-max". ``tools`` are attached to the leading
    system/developer message (a system message is inserted when there is none). When the conversation
    ends with a user/developer turn and ``add_generation_prompt`` is true, the generation prefix
    (:func:`mode_generation_prefix`) is appended; a conversation ending with an assistant message is
    complete and gets nothing appended. Task tokens of a final message are always emitted.
    """
    t = texts or DEFAULT_TEXTS
    thinking = _is_thinking(mode)
    turns = _merge_turns(_prepare(messages, tools))
    _sort_tool_results(turns)
    drop = thinking and not any(turn.get("tools") for turn in turns)
    if drop:
        turns = _drop_old_reasoning(turns)
    last_user = _last_user_index(turns)
    out = [t.bos, t.reasoning_effort_max if mode == "think-max" else ""]
    for i in range(len(turns)):
        # user turns open reasoning from the last user turn on; assistant turns keep it after it
        bound = last_user + 1 if turns[i]["role"] == "assistant" else last_user
        opens = thinking and (not drop or i >= bound)
        out.append(_render_body(i, turns, opens, t))
        out.append(_render_transition(i, turns, thinking, opens, t, add_generation_prompt))
    return "".join(out)


# ----------------------------------------------------------------------------- parsing
def _parse_tool_calls(block: str, t: PromptTexts) -> list[dict]:
    """Parse a DSML tool-calls block into ``[{"name", "arguments": dict}]``; ValueError if malformed."""
    d, name = re.escape(t.dsml), re.escape(t.tool_calls_block_name)
    whole = re.fullmatch(rf"<{d}{name}>\n(.*?)\n</{d}{name}>\s*", block, flags=re.S)
    if whole is None:
        raise ValueError(f"malformed tool-calls block: {block[:200]!r}")
    invoke = re.compile(rf'<{d}invoke name="(.*?)">\n(.*?)\n?</{d}invoke>', flags=re.S)
    param = re.compile(rf'<{d}parameter name="(.*?)" string="(true|false)">(.*?)</{d}parameter>', flags=re.S)
    body, calls, pos = whole.group(1), [], 0
    for inv in invoke.finditer(body):
        args, ppos, inner = {}, 0, inv.group(2)
        for par in param.finditer(inner):
            key, is_str, raw = par.groups()
            if inner[ppos:par.start()].strip() or key in args:
                raise ValueError(f"malformed or duplicate parameter {key!r} in tool call {inv.group(1)!r}")
            args[key] = raw if is_str == "true" else _json_or_raw(raw)
            ppos = par.end()
        if body[pos:inv.start()].strip() or inner[ppos:].strip():
            raise ValueError(f"unexpected text in tool call {inv.group(1)!r}")
        calls.append({"name": inv.group(1), "arguments": args})
        pos = inv.end()
    if body[pos:].strip():
        raise ValueError(f"unexpected text in tool-calls block: {body[pos:][:200]!r}")
    return calls


def _json_or_raw(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw  # model wrote an invalid JSON value: keep its text


def parse_completion(text: str, texts: PromptTexts | None = None) -> dict:
    """Parse generated text (what follows the generation prefix) into reasoning, content and tool calls.

    Reasoning is the text before ``</think>`` (a leading ``<think>`` is removed), ``None`` when there is
    no ``</think>`` before the tool calls. Everything from the first EOS on is cut. Tool-call parameters
    with ``string="true"`` are raw strings, ``string="false"`` JSON values.
    """
    t = texts or DEFAULT_TEXTS
    text = text.split(t.eos, 1)[0]
    block_open = f"<{t.dsml}{t.tool_calls_block_name}>"
    reasoning = None
    end, call_at = text.find(t.think_end), text.find(block_open)
    if end != -1 and (call_at == -1 or end < call_at):
        reasoning = text[:end].removeprefix(t.think_start)
        text = text[end + len(t.think_end):]
    call_at = text.find(block_open)
    if call_at == -1:
        return {"reasoning": reasoning, "content": text, "tool_calls": []}
    content = text[:call_at]
    content = content[:-2] if content.endswith("\n\n") else content
    return {"reasoning": reasoning, "content": content, "tool_calls": _parse_tool_calls(text[call_at:], t)}


# ----------------------------------------------------------------------------- quick instructions
def quick_instruction_prompt(task: str, messages: list[dict], mode: str = "chat",
                             texts: PromptTexts | None = None, url: str | None = None,
                             tools: list[dict] | None = None) -> tuple[str, str]:
    """``(prefix, suffix)`` for a quick-instruction task (§13.3): fork the decode state at ``prefix``.

    Branch points (``prefix``), all renderings the main conversation computes anyway:

    * ``action``: the conversation up to the last user/developer message *with* its generation prefix,
      i.e. exactly the normal generation prompt; suffix ``<｜action｜>``.
    * ``query`` / ``authority`` / ``domain``: the same conversation ending right after the user text
      (no Assistant token); suffix the task token.
    * ``read_url``: as ``query``; suffix ``<｜extracted_url｜>{url}<｜read_url｜>``.
    * ``title``: the conversation up to and including the first assistant reply's EOS, rendered as it
      was when that reply was generated (reasoning kept in thinking modes); suffix ``<｜title｜>``.

    The model's output after ``prefix + suffix`` answers the task and is discarded afterwards.
    """
    suffix = quick_instruction_suffix(task, texts, url)
    _is_thinking(mode)
    msgs = list(messages)
    if task == "title":
        first = next((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), None)
        if first is None:
            raise ValueError("task 'title' needs a conversation with an assistant reply")
        return render(msgs[:first + 1], tools, mode, texts), suffix
    last = max((i for i, m in enumerate(msgs) if m.get("role") in ("user", "developer")), default=None)
    if last is None:
        raise ValueError(f"task {task!r} needs a conversation with a user message")
    prefix = render(msgs[:last + 1], tools, mode, texts, add_generation_prompt=task == "action")
    return prefix, suffix
