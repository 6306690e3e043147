"""Prompt/answer and preference datasets from files, and preference pairs as token arrays.

    examples = load_prompt_answer("gsm8k_train.jsonl")            # list[Example]
    pairs = load_preferences("prefs.jsonl")                        # list[PreferencePair]
    arrays, stats = encode_preferences(tok, pairs, max_prompt_len=256, max_response_len=256)
    arrays["prompt_tokens"], arrays["chosen_mask"], ...            # the DPO / reward-model batch layout

Record formats (JSONL, JSON array or Parquet; see docs/tasks.md):
  prompt/answer:  {"prompt": "text", "answer": "42", ...}  or  {"messages": [{"role", "content"}, ...], "answer": ...}
  unpaired (KTO): {"prompt": "text", "completion": "text", "label": true}   (or prompt/completion as messages)
  preferences:    {"prompt": "text", "chosen": "text", "rejected": "text"}
                  {"prompt": [messages], "chosen": [assistant messages] | "text", "rejected": ...}
                  {"chosen": [messages], "rejected": [messages]}   (the shared leading messages are the prompt)
Other fields go to `meta`. A missing field or a value of the wrong type raises DataError naming the
field, the file:line and the expected type.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from jaxrl_llm.records import DataError, json_type, read_records
from jaxrl_llm.tasks.base import Example, Prompt
from jaxrl_llm.tokenizer import tokenizer_info

Messages = list[dict[str, str]]
Overlong = Literal["truncate", "drop", "error"]
_MESSAGE_HINT = 'a list of {"role": "...", "content": "..."} objects'


def _messages(value: Any, field: str, where: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {field!r} is {json_type(value)}"
                        f"{' (empty)' if isinstance(value, list) else ''}; expected {_MESSAGE_HINT}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise DataError(f"{where}: field {field!r}[{i}] is {json_type(m)}; expected an object "
                            '{"role": "...", "content": "..."}')
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"{where}: field {field!r}[{i}] has no {key!r} (has {sorted(m)}); expected "
                                '{"role": "...", "content": "..."}')
            if not isinstance(m[key], str):
                raise DataError(f"{where}: field {field!r}[{i}].{key} is {json_type(m[key])}; expected a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _present(record: Mapping, field: str) -> bool:
    return record.get(field) is not None  # Parquet gives null for a column a row does not use


def _text(record: Mapping, field: str, where: str) -> str:
    if not _present(record, field):
        raise DataError(f"{where}: missing field {field!r} (has {sorted(record)}); expected a string")
    if not isinstance(record[field], str):
        raise DataError(f"{where}: field {field!r} is {json_type(record[field])}; expected a string")
    return record[field]


def load_prompt_answer(path: str | pathlib.Path, prompt_field: str = "prompt", answer_field: str = "answer",
                       messages_field: str = "messages") -> list[Example]:
    """Examples from a file whose records hold a prompt (text, or chat messages) and a gold answer.

    The prompt is `prompt_field` (a string, or a message list) or `messages_field` (a message list), not
    both. The answer must be a string; an integer is taken as its decimal text. Other fields go to meta.
    """
    examples = []
    for where, record in read_records(path):
        has_prompt, has_messages = _present(record, prompt_field), _present(record, messages_field)
        if has_prompt and has_messages:
            raise DataError(f"{where}: has both {prompt_field!r} and {messages_field!r}; give the prompt as "
                            "text in one or as chat messages in the other")
        if not (has_prompt or has_messages):
            raise DataError(f"{where}: missing field {prompt_field!r} (a string) or {messages_field!r} "
                            f"({_MESSAGE_HINT}); the record has {sorted(record)}")
        field = prompt_field if has_prompt else messages_field
        value = record[field]
        prompt: Prompt = value if has_prompt and isinstance(value, str) else _messages(value, field, where)
        if not _present(record, answer_field):
            raise DataError(f"{where}: missing field {answer_field!r} (has {sorted(record)}); expected a string")
        answer = record[answer_field]
        if isinstance(answer, int) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str):
            raise DataError(f"{where}: field {answer_field!r} is {json_type(answer)}; expected a string "
                            "(the gold answer in canonical text form, e.g. \"42\")")
        meta = {k: v for k, v in record.items() if k not in (prompt_field, answer_field, messages_field)}
        examples.append(Example(prompt=prompt, answer=answer, meta=meta))
    return examples


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred and a dispreferred response.

    Text pairs: prompt, chosen, rejected are strings. Chat pairs: prompt is the shared message list and
    chosen / rejected the messages that follow it (starting with an assistant turn).
    where: the record it came from ("file.jsonl:12"), for error messages.
    """

    prompt: Prompt
    chosen: str | Messages
    rejected: str | Messages
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    where: str = dataclasses.field(default="", compare=False)

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.prompt, str)


def _response(value: Any, field: str, where: str) -> Messages:
    msgs = [{"role": "assistant", "content": value}] if isinstance(value, str) else _messages(value, field, where)
    if msgs[0]["role"] != "assistant":
        raise DataError(f"{where}: field {field!r} starts with a {msgs[0]['role']!r} message; the response must "
                        "start with an 'assistant' message (the turn the model generates)")
    return msgs


def _pair(record: Mapping, where: str, prompt_field: str, chosen_field: str, rejected_field: str) -> PreferencePair:
    pair = _read_pair(record, where, prompt_field, chosen_field, rejected_field)
    if pair.chosen == pair.rejected:
        raise DataError(f"{where}: {chosen_field!r} and {rejected_field!r} are the same response "
                        f"({_describe_response(pair.chosen)}); a pair without a difference carries no preference: "
                        "fix or remove this record")
    return pair


def _describe_response(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _read_pair(record: Mapping, where: str, prompt_field: str, chosen_field: str,
               rejected_field: str) -> PreferencePair:
    for field in (chosen_field, rejected_field):
        if not _present(record, field):
            raise DataError(f"{where}: missing field {field!r} (has {sorted(record)}); expected a string "
                            f"or {_MESSAGE_HINT}")
    chosen, rejected = record[chosen_field], record[rejected_field]
    meta = {k: v for k, v in record.items() if k not in (prompt_field, chosen_field, rejected_field)}
    prompt = record.get(prompt_field)
    if isinstance(prompt, str):
        for field in (chosen_field, rejected_field):
            if isinstance(record[field], list):
                raise DataError(f"{where}: field {field!r} is a message list but {prompt_field!r} is a string; "
                                f"chat pairs need {prompt_field!r} as messages too ({_MESSAGE_HINT}), text pairs "
                                "need strings for all three")
            _text(record, field, where)
        return PreferencePair(prompt, chosen, rejected, meta, where)
    if prompt is not None:  # explicit chat prompt; responses are strings or assistant messages
        return PreferencePair(_messages(prompt, prompt_field, where), _response(chosen, chosen_field, where),
                              _response(rejected, rejected_field, where), meta, where)
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise DataError(f"{where}: missing field {prompt_field!r}; text pairs need a {prompt_field!r} string, and "
                        f"chat pairs without one need {chosen_field!r} and {rejected_field!r} as message lists "
                        "that share the prompt messages")
    chosen, rejected = _messages(chosen, chosen_field, where), _messages(rejected, rejected_field, where)
    k = 0  # the implicit prompt: the longest shared leading run of messages
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == 0:
        raise DataError(f"{where}: {chosen_field!r} and {rejected_field!r} share no leading message, so there is "
                        f"no prompt; add a {prompt_field!r} field or start both with the same prompt messages")
    if k == len(chosen) or k == len(rejected):
        raise DataError(f"{where}: {chosen_field!r} or {rejected_field!r} has no message after the shared prompt "
                        "(the two conversations are identical, or one is a prefix of the other)")
    return PreferencePair(chosen[:k], _response(chosen[k:], chosen_field, where),
                          _response(rejected[k:], rejected_field, where), meta, where)


def load_preferences(path: str | pathlib.Path, prompt_field: str = "prompt", chosen_field: str = "chosen",
                     rejected_field: str = "rejected") -> list[PreferencePair]:
    """Preference pairs from a file: text pairs, or chat pairs (TRL's conversational preference format)."""
    return [_pair(record, where, prompt_field, chosen_field, rejected_field) for where, record in read_records(path)]


@dataclasses.dataclass(frozen=True)
class UnpairedExample:
    """A prompt, one completion and its label (True: desirable), for KTO (TRL's unpaired preference format).

    Text: prompt and completion are strings. Chat: prompt is a message list and completion the messages that
    follow it (starting with an assistant turn). where: the record it came from ("file.jsonl:12").
    """

    prompt: Prompt
    completion: str | Messages
    label: bool
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    where: str = dataclasses.field(default="", compare=False)


def _unpaired(record: Mapping, where: str, prompt_field: str, completion_field: str,
              label_field: str) -> UnpairedExample:
    if not _present(record, label_field):
        raise DataError(f"{where}: missing field {label_field!r} (has {sorted(record)}); expected true (a desirable "
                        "completion) or false (an undesirable one)")
    label = record[label_field]
    if not isinstance(label, (bool, np.bool_)):
        raise DataError(f"{where}: field {label_field!r} is {json_type(label)} ({label!r}); expected true or false")
    for field in (prompt_field, completion_field):
        if not _present(record, field):
            raise DataError(f"{where}: missing field {field!r} (has {sorted(record)}); expected a string or "
                            f"{_MESSAGE_HINT}")
    prompt, completion = record[prompt_field], record[completion_field]
    meta = {k: v for k, v in record.items() if k not in (prompt_field, completion_field, label_field)}
    if isinstance(prompt, str):
        if isinstance(completion, list):
            raise DataError(f"{where}: field {completion_field!r} is a message list but {prompt_field!r} is a "
                            f"string; chat records need {prompt_field!r} as messages too ({_MESSAGE_HINT})")
        return UnpairedExample(prompt, _text(record, completion_field, where), bool(label), meta, where)
    return UnpairedExample(_messages(prompt, prompt_field, where), _response(completion, completion_field, where),
                           bool(label), meta, where)


def load_unpaired(path: str | pathlib.Path, prompt_field: str = "prompt", completion_field: str = "completion",
                  label_field: str = "label") -> list[UnpairedExample]:
    """Unpaired examples {"prompt", "completion", "label": true/false} from a file (TRL's unpaired preference
    format; text or chat). A missing field or a value of the wrong type raises DataError naming file:line."""
    return [_unpaired(record, where, prompt_field, completion_field, label_field)
            for where, record in read_records(path)]


def unpair(pairs: Sequence[PreferencePair]) -> list[UnpairedExample]:
    """Each pair as two unpaired examples, in order: (prompt, chosen, desirable), (prompt, rejected, undesirable)
    (TRL's `unpair_preference_dataset`)."""
    return [UnpairedExample(p.prompt, resp, label, p.meta, p.where)
            for p in pairs for resp, label in ((p.chosen, True), (p.rejected, False))]


def encode_unpaired(tokenizer, examples: Sequence[UnpairedExample], max_prompt_len: int,
                    max_response_len: int) -> tuple[dict[str, np.ndarray], PreferenceStats]:
    """Token arrays for KTO: prompt_tokens / prompt_mask [N, max_prompt_len] left-padded, completion_tokens /
    completion_mask [N, max_response_len] right-padded (ending with an EOS unless truncated), label bool [N].
    Encoded as `encode_preferences` encodes a chosen response (over-long prompts keep their last tokens,
    completions their first); stats count examples."""
    as_pairs = [PreferencePair(e.prompt, e.completion, e.completion, e.meta, e.where) for e in examples]
    arrays, stats = encode_preferences(tokenizer, as_pairs, max_prompt_len, max_response_len)
    out = {"prompt_tokens": arrays["prompt_tokens"], "prompt_mask": arrays["prompt_mask"],
           "completion_tokens": arrays["chosen_tokens"], "completion_mask": arrays["chosen_mask"],
           "label": np.array([examples[i].label for i in stats.kept], bool)}
    # each example went in as chosen and rejected: its truncation counted twice
    return out, dataclasses.replace(stats, responses_truncated=stats.responses_truncated // 2)


@dataclasses.dataclass(frozen=True)
class PreferenceStats:
    """What `encode_preferences` did: counts of truncated and dropped pairs, and which pairs were kept."""

    num_pairs: int
    prompts_truncated: int  # prompts cut on the left to max_prompt_len
    responses_truncated: int  # chosen or rejected responses cut on the right (each counts; they lose their EOS)
    dropped_prompt: int  # pairs dropped because the prompt was too long
    dropped_response: int  # pairs dropped because a response was too long
    kept: tuple[int, ...]  # indices into `pairs` of the encoded rows

    def metrics(self, prefix: str = "data") -> dict[str, float]:
        return {f"{prefix}/{k}": float(getattr(self, k)) for k in
                ("num_pairs", "prompts_truncated", "responses_truncated", "dropped_prompt", "dropped_response")}


def _check_mode(name: str, mode: str) -> None:
    if mode not in ("truncate", "drop", "error"):
        raise ValueError(f"{name} must be 'truncate', 'drop' or 'error', got {mode!r}")


def _end_with_eos(ids: list[int], eos_ids: Sequence[int]) -> list[int]:
    """Ends at the last EOS the chat template wrote (e.g. Qwen's <|im_end|>, dropping the newline after it,
    which generation never reaches), or appends the tokenizer's EOS: the model must learn to stop."""
    for j in range(len(ids) - 1, -1, -1):
        if ids[j] in eos_ids:
            return ids[: j + 1]
    return ids + [eos_ids[0]]


def _render(tokenizer, pairs: Sequence[PreferencePair]) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Token ids of every pair's prompt, chosen and rejected response (tokenized in batches)."""
    heads, chosen, rejected = [], [], []
    for i, p in enumerate(pairs):
        if not p.is_chat:
            heads.append(p.prompt)
            chosen.append(p.chosen)
            rejected.append(p.rejected)
            continue
        # The template holds BOS and role markers; the response is what the full conversation adds after
        # the prompt rendered with the generation prompt (what the sampler will see).
        head = tokenizer.apply_chat_template(list(p.prompt), tokenize=False, add_generation_prompt=True)
        heads.append(head)
        for side, out in (("chosen", chosen), ("rejected", rejected)):
            full = tokenizer.apply_chat_template(list(p.prompt) + list(getattr(p, side)), tokenize=False)
            if not full.startswith(head):
                raise DataError(f"{p.where or f'pair {i}'}: the chat template renders prompt + {side} so that it "
                                "does not start with the prompt rendered with add_generation_prompt=True; this "
                                "tokenizer's template cannot split prompt and response (use text pairs)")
            out.append(full[len(head):])
    prompt_ids: list[list[int]] = [[] for _ in pairs]
    for chat in (False, True):  # plain text gets the tokenizer's own BOS; rendered chat already has it
        rows = [i for i, p in enumerate(pairs) if p.is_chat == chat]
        if rows:
            for i, ids in zip(rows, tokenizer([heads[i] for i in rows], add_special_tokens=not chat)["input_ids"]):
                prompt_ids[i] = ids
    encode = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []  # noqa: E731
    return prompt_ids, encode(chosen), encode(rejected)


def encode_preferences(tokenizer, pairs: Sequence[PreferencePair], max_prompt_len: int, max_response_len: int, *,
                       overlong_prompt: Overlong = "truncate",
                       overlong_response: Overlong = "truncate") -> tuple[dict[str, np.ndarray], PreferenceStats]:
    """Token arrays for preference training (DPO, reward models), and what was truncated or dropped.

    Returns (arrays, stats); arrays has prompt_tokens / prompt_mask int32/bool [N, max_prompt_len]
    left-padded, chosen_tokens / chosen_mask and rejected_tokens / rejected_mask [N, max_response_len]
    right-padded, padded with the tokenizer's pad id. Every response ends with an EOS id unless truncated.
    Over-long prompts keep their last tokens ("truncate"), over-long responses their first; "drop" leaves
    the pair out (stats.kept lists the pairs encoded); "error" raises DataError naming the record.
    """
    _check_mode("overlong_prompt", overlong_prompt)
    _check_mode("overlong_response", overlong_response)
    if max_prompt_len < 1 or max_response_len < 1:
        raise ValueError(f"max_prompt_len and max_response_len must be >= 1, got {max_prompt_len}, {max_response_len}")
    info = tokenizer_info(tokenizer)
    prompts, chosen, rejected = _render(tokenizer, pairs)
    rows, kept = [], []
    counts = {"prompts_truncated": 0, "responses_truncated": 0, "dropped_prompt": 0, "dropped_response": 0}
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        where = pairs[i].where or f"pair {i}"
        if not p:
            raise DataError(f"{where}: the prompt is empty after tokenization; the first response token needs "
                            "at least one prompt token before it")
        c, r = _end_with_eos(c, info.eos_ids), _end_with_eos(r, info.eos_ids)
        prompt_long = len(p) > max_prompt_len
        long = {side: len(ids) for side, ids in (("chosen", c), ("rejected", r)) if len(ids) > max_response_len}
        if prompt_long and overlong_prompt == "error":
            raise DataError(f"{where}: prompt has {len(p)} tokens > max_prompt_len={max_prompt_len}; raise "
                            "max_prompt_len or pass overlong_prompt='truncate' or 'drop'")
        if long and overlong_response == "error":
            side, n = next(iter(long.items()))
            raise DataError(f"{where}: {side} response has {n} tokens (with EOS) > max_response_len="
                            f"{max_response_len}; raise max_response_len or pass overlong_response='truncate' "
                            "or 'drop'")
        if prompt_long and overlong_prompt == "drop":
            counts["dropped_prompt"] += 1
            continue
        if long and overlong_response == "drop":
            counts["dropped_response"] += 1
            continue
        if prompt_long:
            p = p[-max_prompt_len:]
            counts["prompts_truncated"] += 1
        counts["responses_truncated"] += len(long)
        rows.append((p, c[:max_response_len], r[:max_response_len]))
        kept.append(i)

    n = len(rows)
    out = {"prompt_tokens": np.full((n, max_prompt_len), info.pad_id, np.int32),
           "prompt_mask": np.zeros((n, max_prompt_len), bool)}
    for side in ("chosen", "rejected"):
        out[f"{side}_tokens"] = np.full((n, max_response_len), info.pad_id, np.int32)
        out[f"{side}_mask"] = np.zeros((n, max_response_len), bool)
    for j, (p, c, r) in enumerate(rows):
        out["prompt_tokens"][j, max_prompt_len - len(p):] = p
        out["prompt_mask"][j, max_prompt_len - len(p):] = True
        for side, ids in (("chosen", c), ("rejected", r)):
            out[f"{side}_tokens"][j, :len(ids)] = ids
            out[f"{side}_mask"][j, :len(ids)] = True
    return out, PreferenceStats(num_pairs=len(pairs), kept=tuple(kept), **counts)
