"""Chat encoding (v4jax.chat): reference cases byte for byte, structure with v4jax's default texts,
completion parsing, loading the official texts without executing anything, quick instructions."""
import json
import os
from pathlib import Path

import pytest

from v4jax.chat import (DEFAULT_TEXTS, PromptTexts, load_prompt_texts, mode_generation_prefix,
                        parse_completion, quick_instruction_prompt, quick_instruction_suffix, render,
                        render_tools_section)

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A, D = "<｜User｜>", "<｜Assistant｜>", "｜DSML｜"


def _ref_dir() -> Path:
    env = os.environ.get("V4JAX_ENCODING_REF")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared/reference/encoding"


# ------------------------------------------------------------------ official reference cases
@pytest.mark.parametrize("case,mode", [(1, "think-high"), (2, "think-high"), (3, "think-high"), (4, "chat")])
def test_reference_case_byte_for_byte(case, mode):
    ref = _ref_dir()
    if not (ref / "official_constants.json").is_file():
        pytest.skip(f"official encoding cases not found at {ref} (their terms forbid copying them into the "
                    "repository; set V4JAX_ENCODING_REF to a copy of shared/reference/encoding)")
    texts = load_prompt_texts(ref / "official_constants.json")
    data = json.loads((ref / f"case_{case}.input.json").read_text(encoding="utf-8"))
    if isinstance(data, dict):  # case 1: tools travel on the first message
        messages = data["messages"]
        messages[0]["tools"] = data["tools"]
    else:
        messages = data
    expected = (ref / f"case_{case}.expected.txt").read_bytes().decode("utf-8")
    assert render(messages, mode=mode, texts=texts) == expected


def test_reference_constants_loaded():
    ref = _ref_dir()
    if not (ref / "official_constants.json").is_file():
        pytest.skip(f"official encoding cases not found at {ref} (their terms forbid copying them into the "
                    "repository; set V4JAX_ENCODING_REF to a copy of shared/reference/encoding)")
    texts = load_prompt_texts(ref / "official_constants.json")
    assert texts.tools_template.startswith("## Tools\n\n")
    assert texts.tools_template != DEFAULT_TEXTS.tools_template
    assert texts.reasoning_effort_max != DEFAULT_TEXTS.reasoning_effort_max
    assert texts.task_tokens["read_url"] == "<｜read_url｜>"
    assert texts.bos == BOS  # not in the JSON: default kept


# ------------------------------------------------------------------ structure with default texts
CONV = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "Q1"},
    {"role": "assistant", "reasoning_content": "R1", "content": "A1"},
    {"role": "user", "content": "Q2"},
]


def test_multi_turn_generation_prefixes_and_dropped_reasoning():
    head = BOS + "S" + U + "Q1" + A + "</think>A1" + EOS + U + "Q2"
    assert render(CONV, mode="think-high") == head + A + "<think>"
    assert render(CONV, mode="chat") == head + A + "</think>"
    assert render(CONV, mode="think-high", add_generation_prompt=False) == head
    max_block = DEFAULT_TEXTS.reasoning_effort_max
    assert max_block.startswith("Reasoning effort: maximum.\n") and max_block.endswith("\n\n")
    assert render(CONV, mode="think-max") == BOS + max_block + head[len(BOS):] + A + "<think>"


def test_complete_conversation_ends_with_eos():
    conv = CONV + [{"role": "assistant", "reasoning_content": "R2", "content": "A2"}]
    head = BOS + "S" + U + "Q1" + A + "</think>A1" + EOS + U + "Q2" + A
    assert render(conv, mode="think-high") == head + "<think>R2</think>A2" + EOS
    assert render(conv, mode="think-high", add_generation_prompt=False) == head + "<think>R2</think>A2" + EOS
    assert render(conv, mode="chat") == head + "</think>A2" + EOS  # chat mode never renders reasoning


def test_mode_generation_prefix():
    assert mode_generation_prefix("chat") == A + "</think>"
    assert mode_generation_prefix("think-high") == A + "<think>"
    assert mode_generation_prefix("think-max") == A + "<think>"


def test_latest_reminder_and_developer():
    msgs = [{"role": "system", "content": "S"}, {"role": "latest_reminder", "content": "2026-01-01,Mon"},
            {"role": "developer", "content": "find it"}]
    expected = BOS + "S<｜latest_reminder｜>2026-01-01,Mon" + U + "find it" + A + "<think>"
    assert render(msgs, mode="think-high") == expected
    dev_tools = [{"name": "f", "parameters": {}}]
    msgs[2]["tools"] = dev_tools
    assert render(msgs, mode="chat") == (BOS + "S<｜latest_reminder｜>2026-01-01,Mon" + U + "find it\n\n"
                                         + render_tools_section(dev_tools) + A + "</think>")


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
CALLS = [{"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
         {"id": "b", "type": "function", "function": {"name": "g", "arguments": '{"s": "hi é"}'}}]
CALL_BLOCK = ("<" + D + "tool_calls>\n<" + D + 'invoke name="f">\n<' + D + 'parameter name="x" string="false">1</'
              + D + "parameter>\n</" + D + "invoke>\n<" + D + 'invoke name="g">\n<' + D + 'parameter name="s" '
              'string="true">hi é</' + D + "parameter>\n</" + D + "invoke>\n</" + D + "tool_calls>")


def test_tools_section_default_wording():
    section = render_tools_section(TOOLS)
    assert section.startswith("## Tools\n\n")
    assert '\n\n{"name": "f", "parameters": {"type": "object"}}\n\n' in section
    assert "<" + D + "tool_calls>" in section and "{dsml_token}" not in section
    assert section.endswith("with exactly the parameters their schemas define.\n")


def test_tool_calls_results_order_and_interleaved_thinking():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
            {"role": "assistant", "reasoning_content": "R1", "tool_calls": CALLS},
            {"role": "tool", "tool_call_id": "b", "content": "B"},
            {"role": "tool", "tool_call_id": "a", "content": "A"},
            {"role": "user", "content": "more"},
            {"role": "assistant", "reasoning_content": "R2", "content": "done"}]
    turns = (U + "Q" + A + "<think>R1</think>\n\n" + CALL_BLOCK + EOS + U
             + "<tool_result>A</tool_result>\n\n<tool_result>B</tool_result>\n\nmore" + A)
    expected = BOS + "S\n\n" + render_tools_section(TOOLS) + turns + "<think>R2</think>done" + EOS
    assert render(msgs, tools=TOOLS, mode="think-high") == expected
    # without tool definitions the earlier reasoning is dropped
    dropped = turns.replace("<think>R1</think>", "</think>")
    assert render(msgs, mode="think-high") == BOS + "S" + dropped + "<think>R2</think>done" + EOS


def test_tools_without_system_message_insert_one():
    out = render([{"role": "user", "content": "Q"}], tools=TOOLS, mode="chat")
    assert out == BOS + "\n\n" + render_tools_section(TOOLS) + U + "Q" + A + "</think>"


# ------------------------------------------------------------------ completion parsing
def test_parse_completion_reasoning_and_content():
    assert parse_completion("R</think>Hello" + EOS) == {"reasoning": "R", "content": "Hello", "tool_calls": []}
    assert parse_completion("<think>R</think>Hi") == {"reasoning": "R", "content": "Hi", "tool_calls": []}
    assert parse_completion("Plain answer" + EOS + "junk") == {
        "reasoning": None, "content": "Plain answer", "tool_calls": []}


def test_parse_completion_tool_calls():
    text = ("why</think>Let me look.\n\n<" + D + "tool_calls>\n<" + D + 'invoke name="search">\n<' + D
            + 'parameter name="q" string="true">a "b"\nc</' + D + "parameter>\n<" + D + 'parameter name="opts" '
            'string="false">{"n": [1, 2], "ok": true}</' + D + "parameter>\n</" + D + "invoke>\n<" + D
            + 'invoke name="now">\n\n</' + D + "invoke>\n</" + D + "tool_calls>" + EOS)
    assert parse_completion(text) == {
        "reasoning": "why", "content": "Let me look.",
        "tool_calls": [{"name": "search", "arguments": {"q": 'a "b"\nc', "opts": {"n": [1, 2], "ok": True}}},
                       {"name": "now", "arguments": {}}]}
    with pytest.raises(ValueError, match="tool-calls block"):
        parse_completion("x\n\n<" + D + "tool_calls>\nbroken")


def test_round_trip_render_then_parse():
    reply = {"role": "assistant", "reasoning_content": "R", "content": "Calling.", "tool_calls": CALLS}
    prompt = render(CONV + [reply], mode="think-high")
    prefix = render(CONV, mode="think-high")
    assert prompt.startswith(prefix) and prefix.endswith(mode_generation_prefix("think-high"))
    completion = prompt[len(prefix):]
    assert completion == "R</think>Calling.\n\n" + CALL_BLOCK + EOS
    assert parse_completion(completion) == {
        "reasoning": "R", "content": "Calling.",
        "tool_calls": [{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {"s": "hi é"}}]}
    parsed = parse_completion(completion)
    again = {"role": "assistant", "reasoning_content": parsed["reasoning"], "content": parsed["content"],
             "tool_calls": parsed["tool_calls"]}
    assert render(CONV + [again], mode="think-high") == prompt


# ------------------------------------------------------------------ loading texts
def test_load_prompt_texts_json(tmp_path):
    path = tmp_path / "consts.json"
    path.write_text(json.dumps({"USER_SP_TOKEN": "<U>", "DS_TASK_SP_TOKENS": {"title": "<T>"},
                                "REASONING_EFFORT_MAX": "MAX\n", "unrelated": 3}), encoding="utf-8")
    texts = load_prompt_texts(path)
    assert (texts.user, texts.task_tokens["title"], texts.reasoning_effort_max) == ("<U>", "<T>", "MAX\n")
    assert texts.task_tokens["action"] == "<｜action｜>" and texts.eos == EOS
    assert render([{"role": "user", "content": "q"}], mode="think-max", texts=texts) == BOS + "MAX\n<U>q" + A + "<think>"


def test_load_prompt_texts_python_is_parsed_not_executed(tmp_path):
    marker = tmp_path / "EXECUTED"
    repo = tmp_path / "repo"
    (repo / "encoding").mkdir(parents=True)
    (repo / "encoding" / "encoding_dsv4.py").write_text(
        "import os\n"
        f"os.system('touch {marker}')\n"
        f"open({str(marker)!r}, 'w').close()\n"
        'bos_token: str = "<B>"\n'
        'eos_token: str = "<E>"\n'
        'USER_SP_TOKEN = "<U>"\n'
        'DS_TASK_SP_TOKENS = {\n    "action": "<ACT>",\n}\n'
        'TOOLS_TEMPLATE = """T:{dsml_token}:{thinking_start_token}:{thinking_end_token}:{tool_schemas}"""\n'
        'REASONING_EFFORT_MAX = (\n    "max "\n    "effort\\n"\n)\n'
        'assistant_msg_template: str = "{reasoning}" + eos_token\n'
        "VALID_TASKS = set(DS_TASK_SP_TOKENS.keys())\n", encoding="utf-8")
    for source in (repo, repo / "encoding" / "encoding_dsv4.py"):
        texts = load_prompt_texts(source)
        assert (texts.bos, texts.eos, texts.user) == ("<B>", "<E>", "<U>")
        assert texts.task_tokens == {**DEFAULT_TEXTS.task_tokens, "action": "<ACT>"}
        assert texts.reasoning_effort_max == "max effort\n"
        assert render_tools_section([{"name": "f"}], texts) == 'T:' + D + ':<think>:</think>:{"name": "f"}'
    assert not marker.exists()


def test_load_prompt_texts_without_known_keys(tmp_path):
    py = tmp_path / "other.py"
    py.write_text("X = 1\nY = 'a'\n", encoding="utf-8")
    with pytest.raises(ValueError, match="other.py"):
        load_prompt_texts(py)
    js = tmp_path / "other.json"
    js.write_text('{"foo": "bar"}', encoding="utf-8")
    with pytest.raises(ValueError, match="other.json"):
        load_prompt_texts(js)
    with pytest.raises(FileNotFoundError):
        load_prompt_texts(tmp_path)


# ------------------------------------------------------------------ errors
def test_unknown_mode_role_task():
    with pytest.raises(ValueError, match="'thinking'"):
        render(CONV, mode="thinking")
    with pytest.raises(ValueError, match="'robot'"):
        render([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="'summary'.*action, query, authority, domain, title, read_url"):
        quick_instruction_prompt("summary", CONV)
    with pytest.raises(ValueError, match="'summary'"):
        render([{"role": "user", "content": "x", "task": "summary"}])
    with pytest.raises(ValueError, match="url"):
        quick_instruction_prompt("read_url", CONV)


# ------------------------------------------------------------------ quick instructions
def _with_task(messages, index, task):
    out = [dict(m) for m in messages]
    out[index]["task"] = task
    return out


@pytest.mark.parametrize("mode", ["chat", "think-high"])
def test_quick_instruction_action(mode):
    prefix, suffix = quick_instruction_prompt("action", CONV, mode)
    assert prefix == render(CONV, mode=mode)  # exactly the normal generation prompt
    assert prefix.endswith(U + "Q2" + mode_generation_prefix(mode)) and suffix == "<｜action｜>"
    answered = _with_task(CONV, 3, "action") + [{"role": "assistant", "content": "Search"}]
    assert render(answered, mode=mode) == prefix + suffix + "Search" + EOS
    conv = CONV + [{"role": "assistant", "reasoning_content": "R2", "content": "A2"}]
    assert render(conv, mode=mode).startswith(prefix)
    assert quick_instruction_prompt("action", conv, mode) == (prefix, suffix)


@pytest.mark.parametrize("task", ["query", "authority", "domain"])
def test_quick_instruction_after_user_text(task):
    prefix, suffix = quick_instruction_prompt(task, CONV, "think-high")
    assert prefix == BOS + "S" + U + "Q1" + A + "</think>A1" + EOS + U + "Q2"
    assert suffix == f"<｜{task}｜>"
    assert render(CONV, mode="think-high").startswith(prefix)
    assert render(_with_task(CONV, 3, task), mode="think-high") == prefix + suffix


def test_quick_instruction_read_url():
    prefix, suffix = quick_instruction_prompt("read_url", CONV, "chat", url="https://x.org/a")
    assert prefix == render(CONV, mode="chat", add_generation_prompt=False)
    assert suffix == "<｜extracted_url｜>https://x.org/a<｜read_url｜>"
    assert quick_instruction_suffix("read_url", url="u") == "<｜extracted_url｜>u<｜read_url｜>"


def test_quick_instruction_title():
    conv = CONV + [{"role": "assistant", "reasoning_content": "R2", "content": "A2"}]
    prefix, suffix = quick_instruction_prompt("title", conv, "think-high")
    # the state right after the first reply was generated (its reasoning was still in the cache)
    assert prefix == BOS + "S" + U + "Q1" + A + "<think>R1</think>A1" + EOS and suffix == "<｜title｜>"
    assert prefix == render(conv[:3], mode="think-high")
    chat_prefix, _ = quick_instruction_prompt("title", conv, "chat")
    assert chat_prefix == BOS + "S" + U + "Q1" + A + "</think>A1" + EOS
    assert render(conv, mode="chat").startswith(chat_prefix)
    titled = _with_task(conv[:3], 2, "title") + [{"role": "assistant", "content": "Greeting"}]
    assert render(titled, mode="think-high") == prefix + suffix + "Greeting" + EOS
    with pytest.raises(ValueError, match="assistant reply"):
        quick_instruction_prompt("title", CONV[:2])


def test_custom_texts_are_used():
    texts = PromptTexts(user="<u>", assistant="<a>", bos="<s>", eos="</s>")
    assert render(CONV[1:2], mode="chat", texts=texts) == "<s><u>Q1<a></think>"
