"""Multi-turn episodes on the jitted sampler: model turn -> environment -> observation -> model turn ...

    fmt = ObservationFormat.for_tokenizer(tokenizer, chat=True, role="tool")
    mt = make_multiturn_sampler(module, model_cfg, sampling, obs_tokens=24, env=sharding_env)
    ep = run_episodes(mt, params, prompt_tokens, prompt_mask, examples, key, env, tokenizer, fmt,
                      max_turn_tokens=64)
    ep.rollout           # Rollout: tokens [R, N] (turns and observations), mask = the model's tokens
    ep.context_mask      # [R, N] the model's tokens and the observations' (attended)
    ep.rewards           # [R] the episode's return (sum of its turns' rewards)
    ep.step_rewards      # [R, N] each non-final turn's reward at that turn's last token
    ep.correct, ep.metrics

Each turn every live episode writes one turn (`rollout.multiturn`: it stops at the tokenizer's
end-of-turn / EOS tokens, or after `max_turn_tokens`); the host decodes the turns, steps every
episode's environment (`env.step_batch`), and the observations of the episodes that go on are
tokenised and prefilled into the KV cache as one block; then the next turn. An episode ends when
its environment says done, or, truncated, when the token buffer (the sampling config's
max_new_tokens) cannot hold its next turn or observation.

Observations are rendered as the chat template renders a message of role `role` after an
assistant turn (`ObservationFormat.for_tokenizer`: the text the template puts between the model's
end-of-turn token and the observation, the observation, and the template's generation prompt for
the next assistant turn); prompts that are plain text use `template` (PLAIN_TEMPLATE by default: the
observation on a line of its own, so the model can tell where it ends and its own turn begins).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm.errors import ConfigError
from jaxrl_llm.rollout import Rollout
from jaxrl_llm.rollout.multiturn import MultiTurnSampler
from jaxrl_llm.tasks.base import Example
from jaxrl_llm.tokenizer import decode_completions, tokenizer_info

_PROBE_USER, _PROBE_TURN, _PROBE_OBS = "UUUU", "AAAA", "OOOO"
PLAIN_TEMPLATE = "\n{observation}\n"


@dataclasses.dataclass(frozen=True)
class ObservationFormat:
    """The text around an observation: prefix + observation + suffix is appended after the model's turn."""

    prefix: str = ""
    suffix: str = ""

    @classmethod
    def for_tokenizer(cls, tokenizer, chat: bool, role: str = "tool", template: str = PLAIN_TEMPLATE,
                      where: str = "env") -> "ObservationFormat":
        """From the tokenizer's chat template (chat=True: a message of `role` after an assistant turn, then the
        generation prompt) or from `template` (plain-text prompts; it must contain "{observation}")."""
        if not chat:
            if template.count("{observation}") != 1:
                raise ConfigError(f"{where}.observation_template={template!r}: must contain '{{observation}}' "
                                  "exactly once (e.g. '\\nResult: {observation}\\n')")
            pre, post = template.split("{observation}")
            return cls(pre, post)
        history = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_TURN}]
        try:
            a = tokenizer.apply_chat_template(history, tokenize=False)
            b = tokenizer.apply_chat_template(history + [{"role": role, "content": _PROBE_OBS}], tokenize=False,
                                              add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001  (templates raise anything: jinja errors, their own exceptions)
            raise ConfigError(f"{where}.observation_role={role!r}: the tokenizer's chat template cannot render a "
                              f"{role!r} message after an assistant turn ({type(e).__name__}: {e}); set "
                              f"{where}.observation_role='user'") from None
        if not b.startswith(a) or _PROBE_OBS not in b[len(a):]:
            raise ConfigError(f"{where}.observation_role={role!r}: the chat template does not render the "
                              f"conversation incrementally (adding a {role!r} message changes the text before it); "
                              f"try {where}.observation_role='user'")
        tail = a[a.index(_PROBE_TURN) + len(_PROBE_TURN):]  # the template's end of an assistant turn
        for tok_id in tokenizer_info(tokenizer).eos_ids:  # the model writes the end-of-turn token itself
            eos_text = tokenizer.decode([tok_id], skip_special_tokens=False)
            if eos_text and tail.startswith(eos_text):
                tail = tail[len(eos_text):]
                break
        new = b[len(a):]
        i = new.index(_PROBE_OBS)
        return cls(tail + new[:i], new[i + len(_PROBE_OBS):])

    def encode(self, tokenizer, text: str, width: int) -> tuple[list[int], bool]:
        """(token ids of prefix + text + suffix, the text was cut): at most `width` ids; an observation too
        long loses its end, never the template's prefix or suffix."""
        enc = lambda s: tokenizer.encode(s, add_special_tokens=False) if s else []  # noqa: E731
        pre, body, post = enc(self.prefix), enc(text), enc(self.suffix)
        room = width - len(pre) - len(post)
        if room < 0:
            raise ConfigError(f"env.obs_tokens={width}: the observation template alone takes {len(pre) + len(post)} "
                              "tokens; raise env.obs_tokens")
        return pre + body[:room] + post, len(body) > room


@dataclasses.dataclass
class Episodes:
    """A batch of finished episodes (rows prompt-major, n per prompt); see the module docstring."""

    rollout: Rollout
    context_mask: jax.Array
    rewards: np.ndarray
    step_rewards: np.ndarray
    correct: np.ndarray
    metrics: dict[str, float]


def run_episodes(mt: MultiTurnSampler, params, prompt_tokens, prompt_mask, examples: Sequence[Example],
                 key: jax.Array, env, tokenizer, fmt: ObservationFormat, max_turn_tokens: int) -> Episodes:
    """Runs `len(examples) * n_samples` episodes of `env` to the end (see the module docstring).

    prompt_tokens / prompt_mask [B, P] left-padded, rows in the order of `examples`; the sampling key of a
    token at column c is fold_in(key, c), so the same key gives the same episodes.
    """
    if jax.process_count() > 1:
        raise ConfigError("multi-turn environment rollouts run in one process; run without --distributed")
    n_rep, n_cols, width = mt.sampling.n_samples, mt.sampling.max_new_tokens, mt.obs_tokens
    rows = len(examples) * n_rep
    states = [env.reset(e) for e in examples for _ in range(n_rep)]
    finished = np.zeros(rows, bool)   # the episode is over
    done = np.zeros(rows, bool)       # ... because its environment said so (not truncated)
    rewards = np.zeros(rows, np.float64)
    step_rewards = np.zeros((rows, n_cols), np.float32)
    last_col = np.full(rows, -1)      # column of each episode's last model token so far
    last_reward = np.zeros(rows)      # reward of each episode's latest turn
    correct = np.zeros(rows, bool)
    turns = np.zeros(rows, np.int64)
    counts = {"tool_calls": np.zeros(rows), "tool_errors": np.zeros(rows), "out_of_turns": np.zeros(rows)}
    obs_cut = 0
    env_s = 0.0
    st = mt.start(params, prompt_tokens, prompt_mask)
    while not finished.all():
        st = mt.turn(params, st, key, int(max_turn_tokens))
        start, col = int(st.turn_start), int(st.col)
        toks = np.asarray(st.tokens[:, start:col])
        wrote = np.asarray(st.loss_mask[:, start:col]).astype(bool)
        ended = np.asarray(st.ended_turn)
        live = np.flatnonzero(~finished)
        # A turn the buffer cut (no end-of-turn token, buffer full) ends its episode, truncated.
        cut = live[~ended[live] & (col >= n_cols)]
        finished[cut] = True
        live = np.setdiff1d(live, cut)
        texts = decode_completions(tokenizer, toks[live], wrote[live]) if live.size else []
        t0 = time.perf_counter()
        steps = env.step_batch([states[i] for i in live], texts)
        env_s += time.perf_counter() - t0
        for i, s in zip(live, steps):
            turns[i] += 1
            last_col[i] = start + int(np.flatnonzero(wrote[i])[-1])
            step_rewards[i, last_col[i]] += float(s.reward)
            rewards[i] += float(s.reward)
            last_reward[i] = float(s.reward)
            info = s.info or {}
            counts["tool_calls"][i] += bool(info.get("tool_call", info.get("tool")))
            counts["tool_errors"][i] += bool(info.get("tool_error"))
            if s.done:
                finished[i] = done[i] = True
                correct[i] = bool(info.get("correct", False))
                counts["out_of_turns"][i] = bool(info.get("out_of_turns"))
        go_on = np.array([i for i, s in zip(live, steps) if not s.done], np.int64)
        if go_on.size and col + width > n_cols:  # no room for the observation and a turn after it
            finished[go_on] = True
            go_on = go_on[:0]
        st = st.replace(finished=jnp.asarray(finished))
        if not go_on.size:
            continue
        obs = np.full((rows, width), mt.sampling.pad_token_id, np.int32)
        obs_mask = np.zeros((rows, width), np.int32)
        for i, s in zip(live, steps):
            if s.done:
                continue
            ids, was_cut = fmt.encode(tokenizer, s.observation, width)
            if not ids:
                raise ConfigError(f"environment {getattr(env, 'name', type(env).__name__)!r} returned an empty "
                                  "observation for an episode that goes on, and the observation template adds no "
                                  "tokens: give the observation some text, or set env.observation_template (plain-"
                                  "text prompts) / use a chat template that marks the observation's turn")
            obs_cut += was_cut
            obs[i, width - len(ids):] = ids
            obs_mask[i, width - len(ids):] = 1
        st = mt.observe(params, st, jnp.asarray(obs), jnp.asarray(obs_mask))
    # The last turn's reward is the episode's outcome; the earlier turns' stay as dense step rewards.
    has = last_col >= 0
    step_rewards[np.flatnonzero(has), last_col[has]] -= last_reward[has].astype(np.float32)
    loss_mask = st.loss_mask
    ro = Rollout(prompt_tokens=st.prompt_tokens, prompt_mask=st.prompt_mask, tokens=st.tokens, mask=loss_mask,
                 logprobs=st.logprobs, raw_logprobs=st.raw_logprobs, lengths=jnp.sum(loss_mask, axis=-1),
                 finished=jnp.asarray(done), num_steps=st.col)
    metrics = {"episode/turns": float(turns.mean()), "episode/turns_max": float(turns.max(initial=0)),
               "episode/tool_calls": float(counts["tool_calls"].mean()),
               "episode/tool_errors": float(counts["tool_errors"].mean()),
               "episode/out_of_turns": float(counts["out_of_turns"].mean()),
               "episode/truncated": float(1.0 - done.mean()),
               "episode/observations_cut": float(obs_cut), "episode/columns": float(int(st.col)),
               "time/env_s": env_s}
    return Episodes(ro, st.context_mask, rewards.astype(np.float32), step_rewards, correct, metrics)


def transcripts(tokenizer, tokens, context_mask, rows: Sequence[int]) -> list[str]:
    """The text of `rows`' episodes after the prompt: the model's turns and the observations, special tokens
    kept (they show where turns end)."""
    tokens, mask = np.asarray(tokens), np.asarray(context_mask).astype(bool)
    return [tokenizer.decode(tokens[r][mask[r]].tolist(), skip_special_tokens=False,
                             clean_up_tokenization_spaces=False) for r in rows]
