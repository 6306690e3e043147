"""Learning from reflection: lessons in the prompt instead of (or before) changes to the weights.

A round: pick a few attempts with their rewards (`pick_attempts`), ask a model to reflect on them
(`reflection_prompt`, `parse_lesson`) or call a lesson function (`resolve_function`, `fixed_lessons`), drop
candidates that repeat a kept lesson (`near_duplicate`), measure each candidate on the same prompts with and
without it (`inject`, `paired_gain`), keep it only when the interval's lower bound is above the threshold
(`decide`), and keep the kept lessons within a token budget (`fit_budget`). `LessonBase` holds the lessons and
their history in a JSON file a person can read and edit.

    base = LessonBase.load("lessons.txt", count_tokens=token_counter(tokenizer))   # hand-written, one a line
    prompt = inject(example.prompt, base.active_texts(), InjectConfig())

Layering: above tasks (Example, Prompt), records and errors; below data, rewards, search, eval and train, and it
imports none of rollout, search, eval or train: the code that samples and scores lives above it.
"""

from jaxrl_llm.lessons.base import (SOURCES, STATUSES, Lesson, LessonBase, PairedGain, decide, fit_budget, lesson_id,
                                    near_duplicate, normalise, paired_gain, similarity)
from jaxrl_llm.lessons.inject import InjectConfig, block_tokens, inject, inject_example, lesson_block, token_counter
from jaxrl_llm.lessons.reflect import (REFLECTION_PROMPT, Attempt, LessonFn, call_lesson_function, fixed_lessons,
                                       parse_lesson, pick_attempts, prompt_text, reflection_prompt, render_attempts,
                                       resolve_function)

__all__ = ["REFLECTION_PROMPT", "SOURCES", "STATUSES", "Attempt", "InjectConfig", "Lesson", "LessonBase", "LessonFn",
           "PairedGain", "block_tokens", "call_lesson_function", "decide", "fit_budget", "fixed_lessons", "inject",
           "inject_example", "lesson_block", "lesson_id", "near_duplicate", "normalise", "paired_gain",
           "parse_lesson", "pick_attempts", "prompt_text", "reflection_prompt", "render_attempts",
           "resolve_function", "similarity", "token_counter"]
