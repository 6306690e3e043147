"""Putting lessons into prompts: one block of bulleted lessons, in the system message or before a text prompt.

    cfg = InjectConfig(system_prompt="You are a careful solver.")
    prompt = inject(example.prompt, base.active_texts(), cfg)
    example = inject_example(example, base.active_texts(), cfg)
    cost = block_tokens(tokenizer, base.active_texts(), cfg)     # prompt tokens the lessons take

The block is

    <header>
    <bullet><lesson 1>
    <bullet><lesson 2>

A chat prompt that starts with a system message gets the block after that message's content, separated by a
blank line (its own system message stands in for cfg.system_prompt); any other chat prompt gets a new first
system message: cfg.system_prompt, a blank line, the block (just one of them when the other is empty). With
position="prefix" the block goes before the first user message's content instead (for chat templates without
a system role); cfg.system_prompt still makes a system message. A text prompt becomes block + "\\n" + prompt
(system_prompt does not apply: text has no roles). The same cfg with no lessons gives the baseline prompt a
lesson is measured against, so both sides of a paired comparison differ only by the block.

Inputs are never changed: messages are copied.

Layering: imports only jaxrl_llm.tasks (Example, Prompt).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from jaxrl_llm.tasks.base import Example, Prompt

POSITIONS = ("system", "prefix")


@dataclasses.dataclass(frozen=True)
class InjectConfig:
    """header: the block's first line ("" for none). bullet: put before each lesson.
    system_prompt: a base system message, with and without lessons ("" for none).
    position: "system" (chat: in the system message) or "prefix" (chat: before the first user message)."""

    header: str = "Lessons learned from earlier attempts:"
    bullet: str = "- "
    system_prompt: str = ""
    position: str = "system"

    def __post_init__(self):
        if self.position not in POSITIONS:
            raise ValueError(f"InjectConfig.position {self.position!r}: expected one of {', '.join(POSITIONS)}")


def lesson_block(texts: Sequence[str], cfg: InjectConfig = InjectConfig()) -> str:
    """The header line, then one bulleted lesson per line; "" when there are no lessons."""
    if isinstance(texts, str):
        raise TypeError("lesson_block takes a list of lesson texts, not one string")
    if not texts:
        return ""
    lines = ([cfg.header] if cfg.header else []) + [f"{cfg.bullet}{t.strip()}" for t in texts]
    return "\n".join(lines)


def _join(*parts: str) -> str:
    return "\n\n".join(p for p in parts if p)


def inject(prompt: Prompt, texts: Sequence[str], cfg: InjectConfig = InjectConfig()) -> Prompt:
    """The prompt with the lesson block (and cfg.system_prompt) added, as the module docstring says."""
    block = lesson_block(texts, cfg)
    if isinstance(prompt, str):
        return f"{block}\n{prompt}" if block else prompt
    messages = [dict(m) for m in prompt]
    for i, m in enumerate(messages):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TypeError(f"prompt message {i}: every message must have a string 'role' and 'content'")
    has_system = bool(messages) and messages[0]["role"] == "system"
    if not has_system and cfg.system_prompt:
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
        has_system = True
    if not block:
        return messages
    if cfg.position == "prefix":
        user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if user is None:
            raise ValueError("position='prefix' puts the lessons before the first user message, but the prompt "
                             "has none; use position='system'")
        messages[user]["content"] = _join(block, messages[user]["content"])
    elif has_system:
        messages[0]["content"] = _join(messages[0]["content"], block)
    else:
        messages.insert(0, {"role": "system", "content": block})
    return messages


def inject_example(example: Example, texts: Sequence[str], cfg: InjectConfig = InjectConfig()) -> Example:
    """The example with its prompt injected (answer and meta unchanged)."""
    return dataclasses.replace(example, prompt=inject(example.prompt, texts, cfg))


def block_tokens(tokenizer, texts: Sequence[str], cfg: InjectConfig = InjectConfig()) -> int:
    """Tokens of the rendered block (no special tokens); 0 without lessons."""
    block = lesson_block(texts, cfg)
    return len(tokenizer(block, add_special_tokens=False)["input_ids"]) if block else 0


def token_counter(tokenizer) -> Callable[[str], int]:
    """text -> its token count (no special tokens): the `count_tokens` of LessonBase.from_texts / load."""
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return count

