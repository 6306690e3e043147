"""How a model writes a tool call in its turn, and how to read one back: the "tags" and "json" formats.

    parse_tool_call("Let me compute. <calculator>12*34</calculator>", ["calculator"], "tags")
    # ToolCall(name='calculator', argument='12*34', error=None)
    text = format_tool_call("calculator", "12*34", "json", parameter="expression")
    # '<tool_call>\\n{"name": "calculator", "arguments": {"expression": "12*34"}}\\n</tool_call>'
    parse_tool_call(text, ["calculator"], "json")        # ToolCall('calculator', '12*34', None)
    parse_tool_call("408", ["calculator"], "tags")        # None: no call, the turn is a final answer

Formats (CALL_FORMATS holds a one-line description of each for system prompts):

* "tags": `<name>argument</name>`, with `name` one of the given tools. The first complete call in the
  turn counts; text around it is ignored. The argument loses surrounding line breaks (not spaces).
* "json": the Hermes / Qwen2.5 format, `<tool_call>{"name": ..., "arguments": {<parameter>: <value>}}
  </tool_call>`. `arguments` holds exactly one value, a string (a number is taken as its text); it may
  also be given as a JSON string holding that object, as some models write it.

A malformed call (a tag opened and never closed; invalid JSON; an unknown tool name; not exactly one
argument) is not a final answer: `parse_tool_call` returns a `ToolCall` whose `error` says what is
wrong (with `name` the tool it names, or "" when none could be read), and the environment shows the
model "error: <why>" as the tool's output, so it can correct the call.

`format_tool_call` is the inverse: `parse_tool_call(format_tool_call(n, a, f), [n], f)` is
`ToolCall(n, a)` for every argument it accepts ("tags" refuses an argument that contains the closing tag
or begins or ends with a line break, which could not come back unchanged).

Layering: imports only the standard library.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from typing import Sequence

CALL_FORMATS: dict[str, str] = {
    "tags": ("To call a tool, write <TOOL>ARGUMENT</TOOL> (for example <calculator>12*34</calculator>) and end "
             "your turn; the tool's output comes back in the next message."),
    "json": ('To call a tool, write <tool_call>{"name": TOOL, "arguments": {PARAMETER: ARGUMENT}}</tool_call> '
             '(for example <tool_call>{"name": "calculator", "arguments": {"expression": "12*34"}}</tool_call>) '
             "and end your turn; the tool's output comes back in the next message."),
}
TAGS_FORMAT = CALL_FORMATS["tags"]
JSON_FORMAT = CALL_FORMATS["json"]

_JSON_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A tool call read from a turn: the tool's name and its one argument.

    error: None for a well-formed call; for a malformed one, why (then `name` is the tool it names, or ""
        when none could be read, and `argument` is "").
    """

    name: str
    argument: str
    error: str | None = None


def check_call_format(fmt: str) -> str:
    """`fmt` if it is a known call format, else a ValueError naming the formats."""
    if fmt not in CALL_FORMATS:
        near = difflib.get_close_matches(str(fmt), CALL_FORMATS, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"call_format={fmt!r} is not a tool-call format.{hint} Choose one of "
                         f"{', '.join(map(repr, CALL_FORMATS))}")
    return fmt


def _check_tools(tools: Sequence[str]) -> list[str]:
    names = [tools] if isinstance(tools, str) else list(tools)
    if not names:
        raise ValueError("parse_tool_call: no tool names given; pass the names of the tools the model may call")
    return names


def parse_tool_call(text: str, tools: Sequence[str], fmt: str = "tags") -> ToolCall | None:
    """The first tool call in `text` (a model's turn), a `ToolCall` with `error` set for a malformed one, or
    None when the turn calls no tool (it is the final answer)."""
    check_call_format(fmt)
    names = _check_tools(tools)
    if fmt == "tags":
        return _parse_tags(text, names)
    return _parse_json(text, names)


def _parse_tags(text: str, names: list[str]) -> ToolCall | None:
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    complete = re.search(rf"<({alternatives})>(.*?)</\1>", text, re.DOTALL)
    opened = re.search(rf"<({alternatives})>", text)
    if complete is not None and (opened is None or opened.start() >= complete.start()):
        return ToolCall(complete.group(1), complete.group(2).strip("\r\n"))
    if opened is not None:  # the first tag opened is never closed
        name = opened.group(1)
        return ToolCall(name, "", f"<{name}> is not closed; write the call as <{name}>ARGUMENT</{name}>")
    return None


def _parse_json(text: str, names: list[str]) -> ToolCall | None:
    m = _JSON_CALL.search(text)
    if m is None:
        if "<tool_call>" in text:
            return ToolCall("", "", "<tool_call> is not closed with </tool_call>")
        return None
    body = m.group(1).strip()
    try:
        call = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall("", "", f"the tool call is not valid JSON ({e.msg} at character {e.pos})")
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return ToolCall("", "", 'the tool call must be a JSON object with a "name" (a string) and "arguments"')
    name = call["name"]
    if name not in names:
        return ToolCall(name, "", f"unknown tool {name!r}; the tools are {', '.join(map(repr, names))}")
    args = call.get("arguments", call.get("parameters"))
    if isinstance(args, str):  # arguments written as a JSON string holding the object
        try:
            loaded = json.loads(args)
        except json.JSONDecodeError:
            loaded = None
        if not isinstance(loaded, dict):
            return ToolCall(name, args)  # the bare argument itself
        args = loaded
    if not isinstance(args, dict) or len(args) != 1:
        return ToolCall(name, "", f'"arguments" of {name!r} must be an object with exactly one entry, '
                                  f'e.g. {{"arguments": {{"expression": "12*34"}}}}')
    (value,) = args.values()
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return ToolCall(name, "", f"the argument of {name!r} must be a string, not {type(value).__name__}")
    return ToolCall(name, value if isinstance(value, str) else json.dumps(value))


def format_tool_call(name: str, argument: str, fmt: str = "tags", parameter: str = "argument") -> str:
    """The text of a call of tool `name` with `argument` in format `fmt` (the inverse of `parse_tool_call`).

    parameter: the argument's name in the "json" format (a tool's `parameter`, e.g. "expression").
    """
    check_call_format(fmt)
    if not isinstance(name, str) or not name or not isinstance(argument, str):
        raise ValueError(f"format_tool_call: name={name!r} must be a non-empty string and the argument a string")
    if fmt == "tags":
        if f"</{name}>" in argument:
            raise ValueError(f"format_tool_call: the argument {argument!r} contains </{name}>, which would end the "
                             "call early; use call_format='json'")
        if argument != argument.strip("\r\n"):
            raise ValueError(f"format_tool_call: the argument {argument!r} begins or ends with a line break, which "
                             "the tags format drops; strip it")
        return f"<{name}>{argument}</{name}>"
    body = json.dumps({"name": name, "arguments": {parameter: argument}}, ensure_ascii=False)
    return "<tool_call>\n" + body.replace("</", "<\\/") + "\n</tool_call>"  # "<\/" keeps </tool_call> out of strings


__all__ = ["CALL_FORMATS", "JSON_FORMAT", "TAGS_FORMAT", "ToolCall", "check_call_format", "format_tool_call",
           "parse_tool_call"]
