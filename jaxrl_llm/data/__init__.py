"""Datasets: records from files, prompt/answer and preference loaders, task datasets in TFDS, iterators.

    examples = load_prompt_answer("train.jsonl")                       # list[Example]
    pairs = load_preferences("prefs.jsonl"); arrays, stats = encode_preferences(tok, pairs, 256, 256)
    path = build_task_dataset("arithmetic", {"digits": 2}, data_dir=d, splits={"train": 10_000}, seed=0)
    it = PromptIterator(load_task_split(path, "train"), batch_size=64, seed=0)
    batch = next_prompt_batch(it, tok, max_prompt_len=128, overlong="drop")
"""

from jaxrl_llm.data.iterator import PromptIterator, TokenizedPrompts, next_prompt_batch, tokenize_batch
from jaxrl_llm.data.loaders import (PreferencePair, PreferenceStats, encode_preferences, load_preferences,
                                    load_prompt_answer)
from jaxrl_llm.data.tfds_tasks import TaskSource, build_task_dataset, load_task_split
# The file reader is a bottom-layer module (tasks use it too); re-exported here for data users.
from jaxrl_llm.records import DataError, read_records

__all__ = ["DataError", "PreferencePair", "PreferenceStats", "PromptIterator", "TaskSource", "TokenizedPrompts",
           "build_task_dataset", "encode_preferences", "load_preferences", "load_prompt_answer", "load_task_split",
           "next_prompt_batch", "read_records", "tokenize_batch"]
