"""Deterministic, sharded, resumable batches of examples, and their prompts as token arrays.

    it = PromptIterator(load_task_split(path, "train"), batch_size=64, seed=0)
    for step in range(num_steps):
        batch = next_prompt_batch(it, tok, max_prompt_len=256, overlong="drop")   # static [64, 256]
        ...
        save({"data": it.state(), ...})        # JSON-able; later: it.restore(saved["data"])

Epoch e visits the rows of `np.random.default_rng([seed, e]).permutation(len(source))` in global
batches of `batch_size` consecutive positions; shard p of P (one per process feeding its own rows) reads
the p-th contiguous block of batch_size / P rows of each global batch. The global batches, and so a run's
results, do not depend on how many processes read them. With drop_remainder, rows left over at the end
of an epoch that cannot fill a global batch are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from jaxrl_llm.records import DataError
from jaxrl_llm.tasks.base import Example
from jaxrl_llm.tokenizer import encode_prompts

# The position counts global rows, so it is the same on every process (multi-host checkpoints require identical
# metadata) and does not depend on the process layout: a state restores on any number of processes.
_STATE_CHECKED = ("seed", "shuffle", "source_len", "batch_size", "drop_remainder")


class PromptIterator:
    """Yields lists of `Example` forever, epoch after epoch: this shard's rows of each global batch.

    source: any sequence of Example (a list, a `TaskSource`); read with `source.__getitems__` when it has it.
    batch_size: rows of a global batch; each of the process_count shards gets batch_size / process_count.
    process_index / process_count: which contiguous block of each global batch this iterator yields
        (default jax.process_index() / jax.process_count(); stages pass `multihost.data_shard(...)`).
    state() / restore(state): resume exactly, e.g. from a checkpoint (on any process layout).
    """

    def __init__(self, source: Sequence[Example], batch_size: int, seed: int = 0, shuffle: bool = True,
                 process_index: int | None = None, process_count: int | None = None, drop_remainder: bool = True):
        if process_index is None or process_count is None:
            import jax
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index must be in [0, process_count={process_count}), got {process_index}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} (the global batch) must be divisible by the "
                             f"{process_count} shards reading it; choose a multiple of {process_count}")
        if not drop_remainder and process_count > 1:
            raise ValueError("drop_remainder=False needs process_count=1: with several shards every global "
                             "batch must split evenly")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.source, self.batch_size, self.seed, self.shuffle = source, batch_size, seed, shuffle
        self.process_index, self.process_count, self.drop_remainder = process_index, process_count, drop_remainder
        self.local_batch = batch_size // process_count
        self.source_len = len(source)
        if self.source_len == 0 or (drop_remainder and self.source_len < batch_size):
            raise ValueError(f"{self.source_len} examples are fewer than one global batch of {batch_size}; use more "
                             "data or a smaller batch")
        # rows of an epoch this shard reads (the limit on refills in next_prompt_batch)
        self.shard_len = (self.source_len // batch_size * self.local_batch if drop_remainder else self.source_len)
        self.epoch, self.position = 0, 0  # position: global rows of this epoch already read
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def batches_per_epoch(self) -> int:
        n = self.source_len
        return n // self.batch_size if self.drop_remainder else -(-n // self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Source indices of `epoch`, in the order the global batches take them."""
        if self._cached is None or self._cached[0] != epoch:
            n = self.source_len
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._cached = (epoch, order)
        return self._cached[1]

    def shard_indices(self, epoch: int) -> np.ndarray:
        """Source indices this shard reads in `epoch`, in order."""
        order = self.epoch_order(epoch)[: self.batches_per_epoch * self.batch_size]
        blocks = order[: len(order) // self.batch_size * self.batch_size].reshape(-1, self.process_count,
                                                                                  self.local_batch)
        mine = blocks[:, self.process_index].reshape(-1)
        tail = order[len(blocks) * self.batch_size:]  # a partial last batch (drop_remainder=False, one shard)
        return np.concatenate([mine, tail])

    def _read(self, indices: np.ndarray) -> list[Example]:
        if hasattr(self.source, "__getitems__"):
            return list(self.source.__getitems__([int(i) for i in indices]))
        return [self.source[int(i)] for i in indices]

    def _global_take(self, k: int) -> list[Example]:
        """This shard's block of the next k global rows (k a multiple of process_count; within an epoch)."""
        rows = self.epoch_order(self.epoch)[self.position:self.position + k]
        self.position += len(rows)
        per = len(rows) // self.process_count
        return self._read(rows[self.process_index * per:(self.process_index + 1) * per] if per else rows)

    def __iter__(self) -> PromptIterator:
        return self

    def __next__(self) -> list[Example]:
        left = self.source_len - self.position
        if left == 0 or (self.drop_remainder and left < self.batch_size):
            self.epoch, self.position = self.epoch + 1, 0
        return self._global_take(self.batch_size)

    def take(self, k: int) -> list[Example]:
        """The next k rows of this shard's stream, crossing into the next epoch if needed (for refilling a
        batch). With several shards, every process must call it with the same k."""
        out: list[Example] = []
        while len(out) < k:
            left = self.source_len - self.position
            if left < self.process_count:
                self.epoch, self.position = self.epoch + 1, 0
                left = self.source_len
            need = min(k - len(out), left // self.process_count)
            out += self._global_take(need * self.process_count)
        return out

    def state(self) -> dict[str, Any]:
        """A small JSON-able dict; `restore` continues from exactly this point."""
        return {"epoch": self.epoch, "position": self.position,
                **{k: getattr(self, k) for k in _STATE_CHECKED}}

    def restore(self, state: dict[str, Any]) -> None:
        missing = [k for k in ("epoch", "position", *_STATE_CHECKED) if k not in state]
        if missing:
            raise ValueError(f"iterator state is missing {missing} (has {sorted(state)}); pass what state() returned")
        diff = {k: (state[k], getattr(self, k)) for k in _STATE_CHECKED if state[k] != getattr(self, k)}
        if diff:
            text = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"iterator state does not match this iterator ({text}); resuming exactly needs the "
                             "same data, seed, shuffle and batch size. Build the iterator with "
                             "the saved values, or start a fresh one")
        if not (isinstance(state["epoch"], int) and state["epoch"] >= 0
                and isinstance(state["position"], int) and 0 <= state["position"] <= self.source_len):
            raise ValueError(f"iterator state has epoch={state['epoch']!r}, position={state['position']!r}; expected "
                             f"an epoch >= 0 and a position in [0, {self.source_len}]")
        self.epoch, self.position = state["epoch"], state["position"]


class TokenizedPrompts(NamedTuple):
    tokens: np.ndarray  # int32 [B, max_prompt_len], left-padded
    mask: np.ndarray  # bool [B, max_prompt_len]
    examples: list[Example]  # the B examples the rows encode, in order
    num_truncated: int  # prompts cut on the left to max_prompt_len
    num_dropped: int  # over-long examples left out (overlong="drop")


def _is_chat(examples: Sequence[Example]) -> bool:
    kinds = {isinstance(e.prompt, str) for e in examples}
    if len(kinds) > 1:
        raise DataError("the batch mixes text prompts and chat-message prompts; pass chat=True or chat=False, or "
                        "give all examples the same prompt type")
    return kinds == {False}


def tokenize_batch(tokenizer, examples: Sequence[Example], max_prompt_len: int,
                   overlong: Literal["truncate", "drop", "error"] = "truncate",
                   chat: bool | None = None) -> TokenizedPrompts:
    """Prompts of `examples` as a left-padded [B, max_prompt_len] batch (B shrinks with overlong="drop").

    chat=None: chat template for message-list prompts, plain text otherwise. Over-long prompts keep their
    last tokens ("truncate"), are left out ("drop"; see `next_prompt_batch` to refill), or raise ("error").
    """
    if overlong not in ("truncate", "drop", "error"):
        raise ValueError(f"overlong must be 'truncate', 'drop' or 'error', got {overlong!r}")
    if not examples:
        raise ValueError("tokenize_batch got no examples")
    chat = _is_chat(examples) if chat is None else chat
    try:  # one extra column tells which prompts are too long, without tokenizing twice
        enc = encode_prompts(tokenizer, [e.prompt for e in examples], max_prompt_len + 1, chat=chat)
    except (TypeError, ValueError) as e:
        raise DataError(f"cannot tokenize the batch's prompts: {e}") from None
    over = enc.mask[:, 0]
    if overlong == "error" and over.any():
        i = int(np.flatnonzero(over)[0])
        raise DataError(f"batch example {i} (answer {examples[i].answer!r}): prompt is longer than max_prompt_len="
                        f"{max_prompt_len} tokens; raise max_prompt_len or pass overlong='truncate' or 'drop'")
    keep = ~over if overlong == "drop" else np.ones(len(examples), bool)
    return TokenizedPrompts(enc.tokens[keep, 1:], enc.mask[keep, 1:], [e for e, k in zip(examples, keep) if k],
                            num_truncated=0 if overlong == "drop" else int(over.sum()),
                            num_dropped=int((~keep).sum()))


def next_prompt_batch(iterator: PromptIterator, tokenizer, max_prompt_len: int,
                      overlong: Literal["truncate", "drop", "error"] = "truncate", chat: bool | None = None,
                      max_extra: int | None = None) -> TokenizedPrompts:
    """The iterator's next batch, tokenized; with overlong="drop", dropped examples are replaced by the next
    ones from the iterator (counted in num_dropped) so the batch keeps its static size.

    max_extra: replacements to pull before giving up (default: one pass over this process's shard).
    """
    examples = next(iterator)
    chat = _is_chat(examples) if chat is None else chat  # the refills must be rendered the same way
    batch = tokenize_batch(tokenizer, examples, max_prompt_len, overlong, chat)
    target = len(batch.examples) + batch.num_dropped
    parts, pulled = [batch], 0
    limit = iterator.shard_len if max_extra is None else max_extra
    while sum(len(p.examples) for p in parts) < target:
        need = target - sum(len(p.examples) for p in parts)
        if pulled + need > limit:
            raise DataError(f"dropped {sum(p.num_dropped for p in parts)} over-long prompts and pulled {pulled} "
                            f"replacements without filling a batch of {target}; nearly every prompt is longer than "
                            f"max_prompt_len={max_prompt_len}: raise it or use overlong='truncate'")
        parts.append(tokenize_batch(tokenizer, iterator.take(need), max_prompt_len, overlong, chat))
        pulled += need
    if len(parts) == 1:
        return batch
    return TokenizedPrompts(np.concatenate([p.tokens for p in parts]), np.concatenate([p.mask for p in parts]),
                            [e for p in parts for e in p.examples], 0, sum(p.num_dropped for p in parts))
