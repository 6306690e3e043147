"""Multi-turn environments in the stages: the `env` section, RL rollouts as episodes, SFT demonstrations.

An RL stage (grpo family, ppo) with `env.name` set rolls out episodes instead of single completions:

    c.rl = grpo_stage(...)
    c.rl.env.name = "tools"                              # jaxrl_llm.envs registry
    c.rl.env.kwargs = mc.ConfigDict(dict(tools=("calculator",), max_turns=3))
    c.rl.env.obs_tokens = 8                              # columns of one observation block
    c.rl.env.max_turn_tokens = 32                        # tokens of one model turn (0: the whole budget)

`sampling.max_new_tokens` is the budget of a whole episode after the prompt (turns, observations and the
columns a short turn leaves empty, see `rollout.multiturn`). Observation tokens are context only: they are
attended by every forward and never trained (the batch's `completion_context_mask`). GRPO gets each
episode's return (the sum of its turns' rewards); PPO gets the last turn's reward as the outcome and the
earlier turns' rewards as dense rewards at those turns' last tokens (per-turn credit through GAE).

The stage's held-out evaluation adds the episodes' greedy accuracy (`eval/env/accuracy`, with the environment)
to the plain single-turn one (`accuracy`, without it).

An SFT stage with `env.name` set trains on demonstrations: for each example the task's tool calls
(`ToolCallTask.tool_calls`) are run through the environment, and the conversation (calls, observations,
the gold answer) is the target; observation tokens are attended, not trained.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections as mc
import numpy as np

from jaxrl_llm.algos.logprobs import CONTEXT_KEY
from jaxrl_llm.envs.rollout import PLAIN_TEMPLATE
from jaxrl_llm.errors import ConfigError
from jaxrl_llm.rollout.multiturn import make_multiturn_sampler
from jaxrl_llm.tasks.base import Example
from jaxrl_llm.train.validation import flag, integer, unread

OBSERVATION_ROLE = "tool"


def env_section() -> mc.ConfigDict:
    """The `env` section of an RL or SFT stage: empty `name` = single-turn completions."""
    return mc.ConfigDict(dict(name="", kwargs=mc.ConfigDict(), obs_tokens=16, max_turn_tokens=0,
                              observation_role=OBSERVATION_ROLE, observation_template=PLAIN_TEMPLATE,
                              system_prompt=True))


def has_env(s: mc.ConfigDict) -> bool:
    return bool(s.get("env") is not None and s.env.name)


def env_for_task(task, s: mc.ConfigDict, where: str):
    """The environment of section `s` over `task` (a ConfigError naming env.name / env.kwargs otherwise); also
    what the config check builds, so a wrong `env.kwargs` value is an error before anything else is built."""
    from jaxrl_llm.envs import make_env as make
    try:
        return make(str(s.env.name), task, **s.env.kwargs.to_dict())
    except ConfigError as e:
        raise ConfigError(f"{where}.env: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}.env.kwargs: {e}") from None


def check_env_section(cfg: mc.ConfigDict, name: str, budget: int, budget_key: str) -> None:
    """The `env` keys of section `name` (not read without env.name: then they must stay at their defaults)."""
    s, where = cfg[name], f"config.{name}"
    e, ew, d = s.env, f"{where}.env", env_section()
    if not e.name:
        why = f"without {ew}.name (single-turn completions; set it, e.g. to 'tools')"
        for key in ("obs_tokens", "max_turn_tokens", "observation_role", "observation_template", "system_prompt"):
            unread(e, key, ew, d[key], why)
        unread({"kwargs": e.kwargs.to_dict()}, "kwargs", ew, {}, why)
        return
    from jaxrl_llm.envs.base import check_env_name
    try:
        check_env_name(str(e.name))
    except ConfigError as x:
        raise ConfigError(f"{ew}.name: {x}") from None
    integer(e.obs_tokens, f"{ew}.obs_tokens", 1, means="columns of one observation block", example=16)
    integer(e.max_turn_tokens, f"{ew}.max_turn_tokens", 0, means="tokens of one model turn (0: the whole budget)",
            example=64)
    flag(e.system_prompt, f"{ew}.system_prompt")
    if int(e.obs_tokens) >= budget:
        raise ConfigError(f"{ew}.obs_tokens={e.obs_tokens} leaves no room for a turn after an observation in "
                          f"{budget_key}={budget} columns; raise {budget_key} or lower {ew}.obs_tokens")
    if jax.process_count() > 1:
        raise ConfigError(f"{ew}.name={e.name!r}: environment episodes run in one process; run without "
                          "--distributed")
    if s.get("sampling") is not None and int(s.sampling.get("slots", 0)):
        raise ConfigError(f"{ew}.name={e.name!r} with {where}.sampling.slots={s.sampling.slots}: multi-turn "
                          "episodes decode in a static batch (observations join every row between turns); set "
                          f"{where}.sampling.slots=0")
    if s.get("reward") is not None and s.reward.get("source", "task") != "task":
        raise ConfigError(f"{ew}.name={e.name!r} with {where}.reward.source={s.reward.source!r}: an episode's "
                          "rewards are its environment's; set reward.source='task' or leave env.name empty")
    if s.get("process_reward") is not None and s.process_reward.source != "none":
        raise ConfigError(f"{ew}.name={e.name!r} with {where}.process_reward.source={s.process_reward.source!r}: "
                          "process rewards score single completions, not episodes with observations; set "
                          "process_reward.source='none' or leave env.name empty")
    if s.get("reward") is not None:
        from jaxrl_llm.train.stages.rl import _HOST_REWARD_KEYS, reward_section
        for key in _HOST_REWARD_KEYS:
            unread(s.reward, key, f"{where}.reward", reward_section()[key],
                   f"with {ew}.name={e.name!r} (the environment scores each turn on the host)")


def with_system_prompt(example: Example, text: str | None) -> Example:
    """`example` with the environment's description first: a system message (message-list prompts; merged into
    an existing system message) or a first paragraph (text prompts)."""
    if not text:
        return example
    p = example.prompt
    if isinstance(p, str):
        return Example(f"{text}\n\n{p}", example.answer, example.meta)
    msgs = [dict(m) for m in p]
    if msgs and msgs[0].get("role") == "system":
        msgs[0]["content"] = f"{msgs[0]['content']}\n\n{text}"
    else:
        msgs.insert(0, {"role": "system", "content": text})
    return Example(msgs, example.answer, example.meta)


class EpisodeRunner:
    """The environment, its observation format and the jitted multi-turn sampler of one stage section (an RL
    stage's sampling config and completions per prompt; an SFT stage evaluates greedily)."""

    def __init__(self, comp, s: mc.ConfigDict, where: str, sampling, n_samples: int):
        from jaxrl_llm.envs.rollout import ObservationFormat
        self.comp, self.where = comp, where
        self.env = env_for_task(comp.task, s, where)
        e = s.env
        self.system_prompt = self.env.system_prompt() if bool(e.system_prompt) else None
        self.chat = self._chat(comp)
        self.fmt = ObservationFormat.for_tokenizer(comp.tokenizer, self.chat, str(e.observation_role),
                                                   str(e.observation_template), where=f"{where}.env")
        self.obs_tokens = int(e.obs_tokens)
        self.max_turn_tokens = int(e.max_turn_tokens) or int(sampling.max_new_tokens)
        self.sampling = sampling.replace(n_samples=n_samples)
        self.sampler = make_multiturn_sampler(comp.module, comp.model_cfg, self.sampling, self.obs_tokens,
                                              env=comp.env)
        self._greedy = None

    @staticmethod
    def _chat(comp) -> bool:
        """Prompts go through the chat template: as the run says, else when the task's prompts are messages."""
        if comp.chat is not None:
            return bool(comp.chat)
        ex = comp.task.examples("train", 1, 0)
        return bool(ex) and not isinstance(ex[0].prompt, str)

    def prompts(self, examples: list[Example]) -> list[Example]:
        return [with_system_prompt(e, self.system_prompt) for e in examples]

    def run(self, params, tokens, mask, examples, key, sampler=None):
        from jaxrl_llm.envs.rollout import run_episodes
        return run_episodes(sampler or self.sampler, params, tokens, mask, examples, key, self.env,
                            self.comp.tokenizer, self.fmt, self.max_turn_tokens)

    def check_truncation(self, prompts, key: str) -> None:
        """A prompt cut on the left would lose the environment's description: an error naming `key`."""
        if self.system_prompt and int(prompts.num_truncated):
            raise ConfigError(f"{key}: {int(prompts.num_truncated)} prompt(s) with the environment's description "
                              "(env.system_prompt) are longer; raise it (left truncation would cut the description)")

    def evaluate(self, params, examples: list[Example], max_prompt_len: int, seed: int) -> dict[str, float]:
        """Greedy episodes on held-out `examples` (the stage's episode budget): eval/env/accuracy,
        eval/env/reward and the episode metrics."""
        from jaxrl_llm.train.experience import encode_prompts
        if self._greedy is None:
            sc = self.sampling.replace(temperature=0.0, top_k=0, top_p=1.0, n_samples=1)
            self._greedy = make_multiturn_sampler(self.comp.module, self.comp.model_cfg, sc, self.obs_tokens,
                                                  env=self.comp.env)
        exs = self.prompts(examples)
        p = encode_prompts(self.comp.tokenizer, self.comp.env, exs, max_prompt_len, len(exs), chat=self.comp.chat)
        self.check_truncation(p, f"{self.where}.max_prompt_len")
        ep = self.run(params, p.tokens, p.mask, exs, jax.random.key(seed), sampler=self._greedy)
        out = {"eval/env/accuracy": float(ep.correct.mean()), "eval/env/reward": float(ep.rewards.mean())}
        out.update({f"eval/env/{k.split('/', 1)[1]}": v for k, v in ep.metrics.items() if k.startswith("episode/")})
        return out

    def demonstrations(self, examples: list[Example], max_len: int) -> dict[str, Any]:
        """SFT targets of `examples` (`demonstration_targets`): completion_tokens, completion_mask (the model's
        turns) and the context mask (the observations too)."""
        t, m, c, _ = demonstration_targets(self.comp, self.env, self.fmt, examples, max_len, self.obs_tokens,
                                           self.where)
        return {"completion_tokens": t, "completion_mask": m, CONTEXT_KEY: c}

    def experience(self, params, prompts, key, n: int, keep_groups_with_signal: bool = False):
        """An `Experience` of episodes (train.experience.episode_experience)."""
        from jaxrl_llm.train.experience import episode_experience
        ep = self.run(params, prompts.tokens, prompts.mask, prompts.examples, key)
        return episode_experience(ep, prompts, n, keep_groups_with_signal=keep_groups_with_signal)


# ------------------------------------------------------------------ SFT demonstrations


def demonstration_targets(comp, env, fmt, examples: list[Example], max_len: int, obs_tokens: int,
                          where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(tokens, loss mask, context mask) [B, max_len] of each example's demonstration (the task's tool calls
    run through `env`; the model's turns end with the EOS, observations as the rollout appends them), and the
    number of demonstrations cut at max_len."""
    from jaxrl_llm.tasks.base import ToolCallTask
    if not isinstance(comp.task, ToolCallTask):
        raise ConfigError(f"{where}.env.name={env.name!r}: task {type(comp.task).__name__} does not say which tool "
                          "calls solve its examples (the ToolCallTask ability: tool_calls(example)); SFT on "
                          "demonstrations needs it")
    eos, pad = comp.eos_ids[0], comp.pad_id
    toks = np.full((len(examples), max_len), pad, np.int32)
    loss = np.zeros((len(examples), max_len), np.int32)
    ctx = np.zeros((len(examples), max_len), np.int32)
    cut = 0
    for r, ex in enumerate(examples):
        ids, trained = [], []
        for m in env.demonstration(ex, comp.task.tool_calls(ex)):
            if m["role"] == "assistant":
                piece = comp.tokenizer.encode(m["content"], add_special_tokens=False) + [eos]
                ids += piece
                trained += [1] * len(piece)
            else:
                piece, _ = fmt.encode(comp.tokenizer, m["content"], obs_tokens)
                ids += piece
                trained += [0] * len(piece)
        cut += len(ids) > max_len
        ids, trained = ids[:max_len], trained[:max_len]
        toks[r, :len(ids)], loss[r, :len(ids)], ctx[r, :len(ids)] = ids, trained, 1
    return toks, loss, ctx, cut
