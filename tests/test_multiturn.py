"""Multi-turn rollouts: the jitted turn / observe pieces, the episode driver, masks and rewards in training."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.algos import grpo
from jaxrl_llm.algos.logprobs import CONTEXT_KEY, completion_logprobs
from jaxrl_llm.envs.base import Step
from jaxrl_llm.envs.rollout import ObservationFormat, run_episodes
from jaxrl_llm.models import ModelConfig, create_model
from jaxrl_llm.rollout import SamplingConfig, make_sampler
from jaxrl_llm.rollout.multiturn import make_multiturn_sampler
from jaxrl_llm.sharding import ShardingEnv, make_mesh
from jaxrl_llm.tasks.base import Example

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, qkv_bias=True, initializer_range=0.3, max_position_embeddings=96)
PROMPTS = np.array([[0, 11, 12, 13, 14, 15], [0, 0, 0, 21, 22, 23], [0, 0, 0, 0, 0, 31]], np.int32)
PMASK = (np.arange(6)[None, :] >= np.array([1, 3, 5])[:, None]).astype(np.int32)
EOS, PAD, OBS = 3, 1, 5


@pytest.fixture(scope="module")
def model():
    module, params, _ = create_model(CFG, jax.random.key(0), ShardingEnv(make_mesh({"data": 1},
                                                                                   devices=jax.devices()[:1])))
    return module, params


def _random_obs(rng, rows, width, low=1):
    """Right-aligned observation blocks of random lengths in [low, width]."""
    n = rng.integers(low, width + 1, size=rows)
    obs, mask = np.full((rows, width), PAD, np.int32), np.zeros((rows, width), np.int32)
    for r in range(rows):
        obs[r, width - n[r]:] = rng.integers(40, 60, size=n[r])
        mask[r, width - n[r]:] = 1
    return obs, mask


def _episode(module, params, sc, turns=3, width=4, seed=0, key=5):
    mt = make_multiturn_sampler(module, CFG, sc, obs_tokens=width)
    st = mt.start(params, PROMPTS, PMASK)
    rng = np.random.default_rng(seed)
    for _ in range(turns - 1):
        st = mt.turn(params, st, jax.random.key(key), 8)
        obs, mask = _random_obs(rng, st.tokens.shape[0], width)
        st = mt.observe(params, st, jnp.asarray(obs), jnp.asarray(mask))
    return mt.turn(params, st, jax.random.key(key), 8)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 0, 1.0), (1.0, 12, 0.9)])
def test_training_forward_reproduces_the_sampler_across_turns(model, temperature, top_k, top_p):
    module, params = model
    sc = SamplingConfig(max_new_tokens=40, temperature=temperature, top_k=top_k, top_p=top_p, n_samples=2,
                        eos_token_ids=(EOS, 7, 9), pad_token_id=PAD)
    st = _episode(module, params, sc)
    loss, ctx = np.asarray(st.loss_mask), np.asarray(st.context_mask)
    assert ((ctx - loss) > 0).sum() >= 2 * 6  # observation tokens: attended, not trained
    assert (ctx >= loss).all()
    assert ((ctx == 0)[:, :int(st.col)]).any()  # gaps (short turns, short observations) are in the rows
    logp, _ = completion_logprobs(module, params, CFG, st.prompt_tokens, st.prompt_mask, st.tokens, st.loss_mask,
                                  temperature=temperature, context_mask=st.context_mask)
    m = loss > 0
    np.testing.assert_allclose(np.asarray(logp)[m], np.asarray(st.raw_logprobs)[m], atol=2e-5)
    np.testing.assert_array_equal(np.asarray(logp)[~m], 0.0)
    # Without the context mask (observations dropped from attention) the turns after the first disagree.
    wrong, _ = completion_logprobs(module, params, CFG, st.prompt_tokens, st.prompt_mask, st.tokens, st.loss_mask,
                                   temperature=temperature)
    assert np.abs(np.asarray(wrong) - np.asarray(st.raw_logprobs))[m].max() > 1e-2


def test_cache_across_turns_equals_sampling_the_whole_history_as_a_prompt(model):
    """Greedy: the second turn after an observation prefilled into the cache is the turn the plain sampler
    writes from the whole history (prompt, first turn, observation) given as one prompt."""
    module, params = model
    sc = SamplingConfig(max_new_tokens=30, temperature=0.0, eos_token_ids=(EOS,), pad_token_id=PAD)
    mt = make_multiturn_sampler(module, CFG, sc, obs_tokens=4)
    st = mt.start(params, PROMPTS, PMASK)
    st = mt.turn(params, st, jax.random.key(0), 6)
    obs, mask = _random_obs(np.random.default_rng(1), 3, 4)
    st = mt.observe(params, st, jnp.asarray(obs), jnp.asarray(mask))
    c0 = int(st.col)
    st = mt.turn(params, st, jax.random.key(0), 6)
    toks, ctx = np.asarray(st.tokens), np.asarray(st.context_mask)
    for r in range(3):
        history = np.concatenate([PROMPTS[r][PMASK[r] > 0], toks[r, :c0][ctx[r, :c0] > 0]])
        plain = make_sampler(module, CFG, sc.replace(max_new_tokens=6))(
            params, jnp.asarray(history[None]), jnp.ones((1, len(history)), jnp.int32), jax.random.key(0))
        second = toks[r, c0:][ctx[r, c0:] > 0]
        n = int(plain.lengths[0])
        np.testing.assert_array_equal(second[:n], np.asarray(plain.tokens[0, :n]))


def test_holes_change_nothing_in_the_loss(model):
    """A multi-turn batch (gaps between turns) and the same rows compacted (gaps removed) give the same
    log-probs and the same GRPO loss and gradient, in every loss aggregation mode."""
    module, params = model
    sc = SamplingConfig(max_new_tokens=40, temperature=1.0, n_samples=2, eos_token_ids=(EOS, 7), pad_token_id=PAD)
    st = _episode(module, params, sc, seed=3)
    tokens, loss, ctx = np.asarray(st.tokens), np.asarray(st.loss_mask), np.asarray(st.context_mask)
    compact_t, compact_l, compact_c = (np.full_like(tokens, PAD), np.zeros_like(loss), np.zeros_like(ctx))
    for r in range(tokens.shape[0]):
        keep = ctx[r] > 0
        k = int(keep.sum())
        compact_t[r, :k], compact_l[r, :k], compact_c[r, :k] = tokens[r][keep], loss[r][keep], 1
    assert (compact_c != ctx).any()
    rewards = jnp.asarray(np.random.default_rng(0).normal(size=tokens.shape[0]), jnp.float32)

    def loss_and_grad(t, lm, cm, agg):
        cfg = grpo.grpo(group_size=2, beta=0.0).replace(loss=grpo.PolicyLossConfig(loss_agg=agg, norm_length=40.0))
        batch = {"prompt_tokens": st.prompt_tokens, "prompt_mask": st.prompt_mask, "completion_tokens": jnp.asarray(t),
                 "completion_mask": jnp.asarray(lm), CONTEXT_KEY: jnp.asarray(cm)}
        batch["advantages"] = grpo.compute_advantages(cfg, rewards, batch["completion_mask"])
        from jaxrl_llm.algos.aggregation import token_mean_weights

        def f(p):
            logp, _ = grpo.policy_logprobs(module, p, CFG, batch, temperature=1.0, chunk=16)
            from jaxrl_llm.algos.policy_loss import policy_loss
            m = batch["completion_mask"]
            out, _ = policy_loss(cfg.loss, logp, jax.lax.stop_gradient(logp), batch["advantages"],
                                 cfg.loss.token_weights(m), token_mean_weights(m), mask_bt=m)
            return out
        return jax.value_and_grad(f)(params)

    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        (l1, g1), (l2, g2) = loss_and_grad(tokens, loss, ctx, agg), loss_and_grad(compact_t, compact_l, compact_c, agg)
        np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5, atol=1e-7)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)


@dataclasses.dataclass
class _CountingEnv:
    """Episodes of `length` turns; turn t's reward is t + 1 (the last: 10 when the turn contains token text
    'x'... here: always 10); observations are 'o' repeated t + 1 times."""

    length: int = 3
    name: str = "counting"
    seen: list = dataclasses.field(default_factory=list)

    def reset(self, example):
        return {"t": 0, "example": example}

    def step_batch(self, states, turns):
        out = []
        for s, turn in zip(states, turns):
            self.seen.append(turn)
            s["t"] += 1
            done = s["t"] >= self.length
            out.append(Step(observation="" if done else "o" * s["t"], reward=10.0 if done else float(s["t"]),
                            done=done, info={"tool": "" if done else "count", "correct": done}))
        return out

    def system_prompt(self):
        return None


class _CharTokenizer:
    """Token id = 32 + character code offset; EOS 3; enough for decode/encode in the driver."""

    def encode(self, text, add_special_tokens=False):
        return [40 + (ord(c) % 20) for c in text]

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        return "".join(chr(ord("a") + (i % 26)) for i in ids)


def test_episode_driver_rewards_masks_and_determinism(model, monkeypatch):
    from jaxrl_llm import tokenizer as tok_mod
    monkeypatch.setattr("jaxrl_llm.envs.rollout.tokenizer_info",
                        lambda t: tok_mod.TokenizerInfo(pad_id=PAD, eos_ids=(EOS,), vocab_size=64))
    monkeypatch.setattr("jaxrl_llm.tokenizer.tokenizer_info",
                        lambda t: tok_mod.TokenizerInfo(pad_id=PAD, eos_ids=(EOS,), vocab_size=64))
    module, params = model
    sc = SamplingConfig(max_new_tokens=60, temperature=1.0, n_samples=2, eos_token_ids=(EOS,), pad_token_id=PAD)
    mt = make_multiturn_sampler(module, CFG, sc, obs_tokens=4)
    examples = [Example("p", "a") for _ in range(3)]
    env = _CountingEnv()
    ep = run_episodes(mt, params, PROMPTS, PMASK, examples, jax.random.key(2), env, _CharTokenizer(),
                      ObservationFormat(), max_turn_tokens=6)
    rows = 6
    done = np.asarray(ep.rollout.finished)
    assert ep.metrics["episode/turns_max"] <= 3
    # A finished episode got 1 + 2 + 10; its step rewards are the two tool turns' (1 and 2), the outcome 10.
    np.testing.assert_allclose(ep.rewards[done], 13.0)
    np.testing.assert_allclose(ep.step_rewards[done].sum(-1), 3.0)
    assert ep.correct[done].all() and not ep.correct[~done].any()
    loss, ctx = np.asarray(ep.rollout.mask), np.asarray(ep.context_mask)
    for r in np.flatnonzero(done):
        nz = np.flatnonzero(ep.step_rewards[r])
        assert len(nz) == 2 and (loss[r, nz] == 1).all()  # at model tokens ...
        obs_cols = np.flatnonzero(ctx[r] - loss[r])
        assert len(obs_cols) == 1 + 2  # observations "o" and "oo"
        assert (obs_cols > nz[0]).all()  # ... each observation follows the turn it answers
    again = run_episodes(mt, params, PROMPTS, PMASK, examples, jax.random.key(2), _CountingEnv(), _CharTokenizer(),
                         ObservationFormat(), max_turn_tokens=6)
    np.testing.assert_array_equal(np.asarray(again.rollout.tokens), np.asarray(ep.rollout.tokens))
    assert rows == len(ep.rewards)


def test_observation_format_from_a_chatml_template(chatml_tokenizer):
    tok = chatml_tokenizer
    fmt = ObservationFormat.for_tokenizer(tok, chat=True, role="tool")
    assert (fmt.prefix, fmt.suffix) == ("\n<|im_start|>tool\n", "<|im_end|>\n<|im_start|>assistant\n")
    ids, cut = fmt.encode(tok, "5535", 32)
    assert tok.decode(ids) == "\n<|im_start|>tool\n5535<|im_end|>\n<|im_start|>assistant\n" and not cut
    ids, cut = fmt.encode(tok, "5535" * 10, 24)  # too long: the text is cut, never the template
    assert cut and len(ids) == 24 and tok.decode(ids).endswith("<|im_end|>\n<|im_start|>assistant\n")
    # Plain-text prompts: the template string.
    plain = ObservationFormat.for_tokenizer(tok, chat=False, template="\nresult {observation}\n")
    assert (plain.prefix, plain.suffix) == ("\nresult ", "\n")
    from jaxrl_llm.errors import ConfigError
    with pytest.raises(ConfigError, match=r"observation_template=.*\{observation\}"):
        ObservationFormat.for_tokenizer(tok, chat=False, template="no slot")
    with pytest.raises(ConfigError, match="obs_tokens=3"):
        fmt.encode(tok, "1", 3)


# ----------------------------------------------------------------------------- stages: config, SFT targets, PPO credit

EXP = "experiments/tool_calculator.py"


@pytest.mark.parametrize("override, message", [
    ("rl.env.name=tool", r"config\.rl\.env\.name: unknown environment 'tool'\. Did you mean 'tools'\?"),
    ("rl.env.obs_tokens=48", r"config\.rl\.env\.obs_tokens=48 leaves no room .* config\.rl\.sampling\.max_new_tokens"),
    ("rl.env.max_turn_tokens=-1", r"config\.rl\.env\.max_turn_tokens"),
    ("rl.reward.timeout_s=5.0", r"config\.rl\.reward\.timeout_s=5\.0 is not read with config\.rl\.env\.name"),
    ("sft.env.name=", r"config\.sft\.env\.obs_tokens=8 is not read without config\.sft\.env\.name"),
])
def test_env_section_errors_name_the_key(override, message):
    from jaxrl_llm.errors import ConfigError
    from jaxrl_llm.train.config import load_experiment
    with pytest.raises(ConfigError, match=message):
        load_experiment(EXP, [override])


def test_unknown_env_kwarg_is_named_when_the_stage_is_built():
    from jaxrl_llm.envs import make_env
    from jaxrl_llm.errors import ConfigError
    from jaxrl_llm.tasks import get_task
    with pytest.raises(ConfigError, match="max_turns"):
        make_env("tools", get_task("arithmetic"), max_turn=2)


def test_sft_demonstrations_train_the_turns_and_attend_the_observations():
    from jaxrl_llm.envs import make_env
    from jaxrl_llm.envs.rollout import ObservationFormat
    from jaxrl_llm.tasks import get_task
    from jaxrl_llm.tokenizer import load_tokenizer
    from jaxrl_llm.train.stages.episodes import demonstration_targets
    tok = load_tokenizer("tiny")
    task = get_task("arithmetic", min_digits=2, max_digits=3, operators=("*",))
    env = make_env("tools", task, max_turns=2, answer_on_last_turn=False)
    fmt = ObservationFormat.for_tokenizer(tok, chat=False)

    class Comp:
        tokenizer, eos_ids, pad_id = tok, (1,), 0
    Comp.task = task
    examples = task.examples("train", 4, 0)
    t, loss, ctx, cut = demonstration_targets(Comp, env, fmt, examples, 40, 8, "config.sft")
    assert cut == 0
    for r, e in enumerate(examples):
        product = str(e.meta["a"] * e.meta["b"])
        trained = tok.decode(t[r][loss[r] > 0].tolist())
        shown = tok.decode(t[r][(ctx[r] - loss[r]) > 0].tolist())
        assert trained == f"<calculator>{e.meta['a']}*{e.meta['b']}</calculator><eos>{product}<eos>"
        assert shown == f"\n{product}\n"  # the calculator's output: attended, not trained
        assert (ctx[r] >= loss[r]).all() and ctx[r].sum() == len(tok.encode(trained + shown))


def test_ppo_gets_the_last_turn_as_outcome_and_earlier_turns_as_dense_rewards():
    from jaxrl_llm.algos import ppo
    from jaxrl_llm.train.experience import Experience
    mask = jnp.asarray([[1, 1, 0, 0, 1, 1, 0]], jnp.int32)  # turn 1: cols 0-1, observation 2-3, turn 2: cols 4-5
    step = jnp.asarray([[0, 0.5, 0, 0, 0, 0, 0]], jnp.float32)  # the tool turn's reward at its last token
    exp = Experience({}, None, [], jnp.asarray([2.5]), jnp.asarray([True]), {}, 1, step_rewards=step)
    outcome, dense = exp.outcome()
    np.testing.assert_allclose(np.asarray(outcome), [2.0])
    cfg = ppo.PPOConfig(gamma=1.0, lam=1.0, whiten_advantages=False)
    zeros = jnp.zeros(mask.shape)
    t = ppo.compute_targets(cfg, outcome, zeros, zeros, zeros, mask, 0.0, None, dense)
    # values 0, gamma = lam = 1: a token's advantage is the reward still to come, observation columns skipped.
    np.testing.assert_allclose(np.asarray(t["advantages"])[0], [2.5, 2.5, 0, 0, 2.0, 2.0, 0], atol=1e-6)
