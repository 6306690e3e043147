"""Arithmetic with configurable digits and operators: the embedded default task for the CPU demo.

Prompt "12+34=", answer "46". A completion is correct iff its text (EOS
stripped) is exactly the answer. The same check runs inside jit
(`jax_reward`): the completion's tokens are mapped to their bytes with a
[vocab, max_token_bytes] table and compared with the answer's bytes, so the
result equals the text verifier whatever tokenization the model emits
("46" as one token or as "4", "6"), and a whole RL iteration can stay on the
device.

Splits are disjoint by construction: a problem belongs to "test" iff a
stable hash of its text falls in the held-out fraction, and each split's
generator rejects the other split's problems.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm.errors import TaskError
from jaxrl_llm.tasks.base import Example, RewardInputs, RewardOutput, register_task
from jaxrl_llm.tasks.extraction import ANSWER_FORMATS, extract_integer
from jaxrl_llm.tasks.wrong_answers import wrong_number

_OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
                                               "*": lambda a, b: a * b}


def _spaced(text: str) -> str:
    return " ".join(text)


def _in_test_split(problem: str, test_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(problem.encode()).digest()[:8], "little")
    return (h / 2**64) < test_fraction


@register_task("arithmetic")
@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
    """a OP b = ? with operands of min_digits..max_digits digits.

    operators: any of "+", "-", "*". allow_negative=False re-draws problems
    whose result is negative. test_fraction: share of all problems held out
    for the "test" split. spaced=True writes every digit and sign as its own
    word ("4 7 + 8 =" -> "5 5"), so a BPE tokenizer that merges digit pairs
    still gives one token per digit and a model can learn digit-wise rules.
    pad_operands=True zero-pads operands to max_digits and reverse_answer=True
    writes the answer least-significant digit first, zero-padded to the
    widest possible result ("0 7 + 3 8 =" -> "5 4 0" for 45): the format with
    which small transformers learn addition from far fewer samples (Lee et
    al. 2023, "Teaching Arithmetic to Small Transformers", arXiv 2307.03381).
    reverse_answer needs operators without "-" (no sign to place).

    For chat models: `templates` (one or more strings with {a}, {op}, {b}; one is drawn per problem) turn each
    problem into a chat prompt (a user message, e.g. "What is {a} {op} {b}? Answer with just the number."),
    and `answer_format` says how the answer is read from a free-form reply (`tasks.extraction`):
    "exact" (the reply is the answer, the default), "last_number", "boxed" or "answer_line". `format_score`
    is added to the reward of a reply that states an answer in that format (right or wrong), as its own
    reward component "format". Only "exact" has the in-jit reward (`in_jit_reward`).

    answer_prefix=True (with answer_format="exact") judges a completion on its first len(answer) characters
    only: "5 5 0 3 1" is correct for the answer "5 5 0", so a completion may go on after its answer, right or
    wrong, and lengths vary independently of correctness (docs/phenomena.md, GRPO's length bias).
    """

    min_digits: int = 1
    max_digits: int = 2
    operators: tuple[str, ...] = ("+",)
    allow_negative: bool = True
    test_fraction: float = 0.1
    correct_score: float = 1.0
    wrong_score: float = 0.0
    spaced: bool = False
    pad_operands: bool = False
    reverse_answer: bool = False
    templates: tuple[str, ...] = ()
    answer_format: str = "exact"
    format_score: float = 0.0
    answer_prefix: bool = False
    name: str = "arithmetic"

    def __post_init__(self):
        object.__setattr__(self, "operators", tuple(self.operators))
        templates = (self.templates,) if isinstance(self.templates, str) else tuple(self.templates)
        object.__setattr__(self, "templates", templates)
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"arithmetic: answer_format={self.answer_format!r}; expected one of "
                             f"{', '.join(ANSWER_FORMATS)}")
        for t in templates:
            try:
                t.format(a=1, b=2, op="+")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"arithmetic: template {t!r} is not a format string over {{a}}, {{op}}, {{b}} "
                                 f"({type(e).__name__}: {e}); write literal braces as {{{{ }}}}") from None
        if (templates or self.answer_format != "exact") and (self.spaced or self.reverse_answer or self.pad_operands):
            raise ValueError("arithmetic: spaced / pad_operands / reverse_answer are formats for models trained "
                             "from scratch on 'a+b='; use them without templates and with answer_format='exact'")
        if self.answer_prefix and self.answer_format != "exact":
            raise ValueError(f"arithmetic: answer_prefix=True needs answer_format='exact' (got "
                             f"{self.answer_format!r}); the other formats find the answer anywhere in the reply")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"arithmetic: need 1 <= min_digits ({self.min_digits}) <= max_digits ({self.max_digits})")
        bad = [op for op in self.operators if op not in _OPS]
        if bad or not self.operators:
            raise ValueError(f"arithmetic: operators {self.operators!r}; each must be one of {sorted(_OPS)}")
        if self.reverse_answer and "-" in self.operators:
            raise ValueError("arithmetic: reverse_answer needs operators without '-' (a sign has no digit place)")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"arithmetic: test_fraction={self.test_fraction} must be in (0, 1)")

    # ------------------------------------------------------------------ examples

    def _operand(self, rng: random.Random) -> int:
        d = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1)

    def tool_calls(self, example: Example) -> list[tuple[str, str]]:
        """The calculator call that solves `example` (the `ToolCallTask` ability): [("calculator", "a*b")]."""
        m = example.meta
        return [("calculator", f"{m['a']}{m['op']}{m['b']}")]

    def examples(self, split: str, num: int, seed: int) -> list[Example]:
        """`num` problems of `split` ("train" or "test"), deterministic for (split, num, seed)."""
        if split not in ("train", "test"):
            raise ValueError(f"arithmetic: split {split!r}; expected 'train' or 'test'")
        want_test = split == "test"
        rng = random.Random(f"{seed}/{split}")
        out, tries = [], 0
        while len(out) < num:
            tries += 1
            if tries > 1000 * num + 10_000:
                raise ValueError(f"arithmetic: could not draw {num} {split} problems with "
                                 f"{self.min_digits}-{self.max_digits} digits; widen the digit range")
            a, b, op = self._operand(rng), self._operand(rng), rng.choice(self.operators)
            value = _OPS[op](a, b)
            if value < 0 and not self.allow_negative:
                continue
            problem = f"{a}{op}{b}="
            if _in_test_split(problem, self.test_fraction) != want_test:
                continue
            prompt, answer = self._render(a, b, op, value)
            if self.templates:
                text = rng.choice(self.templates).format(a=a, b=b, op=op)
                prompt = [{"role": "user", "content": text}]
            out.append(Example(prompt=prompt, answer=answer, meta={"a": a, "b": b, "op": op}))
        return out

    def _render(self, a: int, b: int, op: str, value: int) -> tuple[str, str]:
        w = self.max_digits
        sa, sb = (f"{a:0{w}d}", f"{b:0{w}d}") if self.pad_operands else (str(a), str(b))
        answer = str(value)
        if self.reverse_answer:
            width = len(str(max(_OPS[o](10 ** w - 1, 10 ** w - 1) for o in self.operators)))
            answer = f"{value:0{width}d}"[::-1]
        prompt = f"{sa}{op}{sb}="
        return (_spaced(prompt), _spaced(answer)) if self.spaced else (prompt, answer)

    # ------------------------------------------------------------------ verification

    @property
    def in_jit_reward(self) -> bool:
        """Whether `jax_reward` applies: only exact-match replies are scored inside jit."""
        return self.answer_format == "exact"

    def extract_answer(self, completion: str) -> str | None:
        if self.answer_format != "exact":
            value, _ = extract_integer(completion, self.answer_format)
            return None if value is None else str(value)
        text = completion.replace(" ", "") if self.spaced else completion.strip()
        if self.reverse_answer:
            text = text[::-1]
        try:
            return str(int(text))
        except ValueError:
            return None

    def is_correct(self, completion: str, example: Example) -> bool:
        if self.answer_format != "exact":
            return self.extract_answer(completion) == example.answer
        if self.answer_prefix:
            return completion.startswith(example.answer)
        return completion == example.answer

    def reward(self, inputs: RewardInputs) -> RewardOutput:
        correct = np.array([self.is_correct(c, e) for c, e in zip(inputs.completions, inputs.examples)], bool)
        scores = np.where(correct, self.correct_score, self.wrong_score).astype(np.float32)
        components = {"answer": scores}
        if self.format_score:
            stated = np.array([extract_integer(c, self.answer_format)[1] for c in inputs.completions], bool)
            components["format"] = np.where(stated, self.format_score, 0.0).astype(np.float32)
            scores = scores + components["format"]
        return RewardOutput(scores=scores, components=components, correct=correct)

    # ------------------------------------------------------------------ preference pairs

    def preference_pair(self, example: Example, rng: random.Random) -> tuple[str, str]:
        """(gold answer, `wrong_arithmetic_answer`): a near miss written in the task's answer format (for chat
        prompts, a reply that states the answer the way `answer_format` reads it)."""
        wrong = wrong_arithmetic_answer(self, example.answer, rng)
        if self.answer_format == "exact":
            return example.answer, wrong
        m = example.meta
        say = {"last_number": "{a} {op} {b} = {v}", "boxed": "{a} {op} {b} = \\boxed{{{v}}}",
               "answer_line": "{a} {op} {b} = {v}\nAnswer: {v}"}[self.answer_format]
        return (say.format(a=m["a"], op=m["op"], b=m["b"], v=example.answer),
                say.format(a=m["a"], op=m["op"], b=m["b"], v=wrong))

    # ------------------------------------------------------------------ inside jit

    def encode_targets(self, examples: Sequence[Example], max_bytes: int | None = None):
        """(target_bytes int32 [B, max_bytes] padded with -1, target_len int32 [B]) for `jax_reward`."""
        raw = [e.answer.encode() for e in examples]
        width = max_bytes or max(len(r) for r in raw)
        if any(len(r) > width for r in raw):
            raise ValueError(f"arithmetic: an answer is longer than max_bytes={width}")
        out = np.full((len(raw), width), -1, np.int32)
        for i, r in enumerate(raw):
            out[i, :len(r)] = np.frombuffer(r, np.uint8)
        return out, np.array([len(r) for r in raw], np.int32)

    def jax_reward(self, tokenizer, vocab_size: int | None = None, eos_ids: Sequence[int] | None = None):
        """A jittable `(completion_tokens [B, N], completion_mask [B, N], target_bytes, target_len) -> [B]`.

        Scores correct_score where the completion's text (EOS and masked
        tokens dropped) equals the target bytes exactly (with answer_prefix:
        starts with them), wrong_score otherwise.
        """
        if not self.in_jit_reward:
            raise TaskError(f"arithmetic: answer_format={self.answer_format!r} is read on the host; set "
                            "reward.in_jit=False (only answer_format='exact' has an in-jit reward)")
        table, lens = token_byte_table(tokenizer, vocab_size)
        if eos_ids is None:
            from jaxrl_llm.tokenizer import tokenizer_info
            eos_ids = tokenizer_info(tokenizer).eos_ids
        match = make_exact_match(table, lens, tuple(eos_ids), prefix=self.answer_prefix)
        hi, lo = self.correct_score, self.wrong_score

        def reward(completion_tokens, completion_mask, target_bytes, target_len):
            return jnp.where(match(completion_tokens, completion_mask, target_bytes, target_len), hi, lo
                             ).astype(jnp.float32)
        return reward


def wrong_arithmetic_answer(task: ArithmeticTask, answer: str, rng: random.Random) -> str:
    """`wrong_number` in the task's answer format (spaced digits; reversed, zero-padded digits)."""
    text = answer.replace(" ", "") if task.spaced else answer
    if task.reverse_answer:  # "540" is 45 written least-significant digit first, zero-padded to 3 places
        width = len(text)
        value = int(text[::-1])
        while True:
            wrong = int(wrong_number(str(value), rng))
            if 0 <= wrong < 10 ** width and wrong != value:
                break
        text = f"{wrong:0{width}d}"[::-1]
    else:
        text = wrong_number(text, rng)
    return _spaced(text) if task.spaced else text


def _byte_level_alphabet() -> dict[int, str]:
    """The GPT-2 byte-level BPE map byte -> printable character (bytes 33-126, 161-172, 174-255 map to
    themselves; the others to 256, 257, ... in order)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def token_byte_table(tokenizer, vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(bytes int32 [V, L] padded with -1, lengths int32 [V]) of every token of a byte-level BPE tokenizer.

    Special tokens (pad, EOS, chat markers) have length 0: they are not text.
    """
    decoder = {u: b for b, u in _byte_level_alphabet().items()}
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    v = vocab_size or len(tokenizer)
    pieces: list[bytes] = []
    for i in range(v):
        tok = tokenizer.convert_ids_to_tokens(i) if i < len(tokenizer) else None
        if tok is None or i in special:
            pieces.append(b"")
            continue
        try:
            pieces.append(bytes(decoder[ch] for ch in tok))
        except KeyError:
            raise ValueError(
                f"token {i} ({tok!r}) is not a byte-level BPE token; the in-jit reward needs a byte-level "
                "tokenizer (GPT-2 style, as Llama 3, Qwen and the tiny tokenizer use)") from None
    width = max(1, max(len(p) for p in pieces))
    table = np.full((v, width), -1, np.int32)
    for i, p in enumerate(pieces):
        table[i, :len(p)] = np.frombuffer(p, np.uint8)
    return table, np.array([len(p) for p in pieces], np.int32)


def make_exact_match(table: np.ndarray, lens: np.ndarray, eos_ids: tuple[int, ...], prefix: bool = False):
    """Jittable bool [B]: the completion's bytes equal the target bytes (length and content; with prefix=True
    its first target_len bytes equal them and it may go on)."""
    table_j, lens_j = jnp.asarray(table), jnp.asarray(lens)
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)
    width = table.shape[1]

    def match(tokens_bn, mask_bn, target_bt, target_len_b):
        tok = tokens_bn.astype(jnp.int32)
        keep = mask_bn.astype(bool) & ~jnp.any(tok[..., None] == eos, axis=-1)
        n_bytes = jnp.where(keep, lens_j[tok], 0)                         # [B, N]
        total = jnp.sum(n_bytes, axis=-1)                                  # [B]
        start = jnp.cumsum(n_bytes, axis=-1) - n_bytes                     # [B, N]
        b, n = tok.shape
        t = target_bt.shape[1]
        j = jnp.arange(width)
        pos = start[..., None] + j                                         # [B, N, W]
        valid = j < n_bytes[..., None]
        # bytes past the target width cannot match anyway; send them (and invalid slots) to a dump column
        pos = jnp.where(valid & (pos < t), pos, t)
        buf = jnp.full((b, t + 1), -2, jnp.int32)
        buf = buf.at[jnp.arange(b)[:, None, None], pos].set(table_j[tok])
        in_target = jnp.arange(t)[None, :] < target_len_b[:, None]
        same = jnp.all(jnp.where(in_target, buf[:, :t] == target_bt, True), axis=-1)
        return same & ((total >= target_len_b) if prefix else (total == target_len_b))

    return match
