"""Continuous batching (`SamplingConfig.slots`): the same rollout as the static batch, its slot schedule,
its slot utilisation on a long-tailed length distribution, sharding and the trainer's config key."""

import importlib.util
import pathlib
import types

import jax
import numpy as np
import pytest

from jaxrl_llm.errors import ConfigError
from jaxrl_llm.models import ModelConfig, create_model
from jaxrl_llm.rollout import SamplingConfig, make_sampler
from jaxrl_llm.rollout.sampler import slot_utilisation, tail_widths
from jaxrl_llm.sharding import ShardingEnv, make_mesh

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, qkv_bias=True, initializer_range=0.3, max_position_embeddings=128)
_R = np.random.default_rng(0)
PROMPTS = _R.integers(3, 64, (5, 7)).astype(np.int32)
PMASK = (np.arange(7)[None, :] >= np.array([0, 2, 4, 6, 1])[:, None]).astype(np.int32)  # left-padded
PROMPTS = PROMPTS * PMASK
FIELDS = ("tokens", "mask", "lengths", "finished", "prompt_tokens", "prompt_mask")


def _bench():
    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "continuous_batching.py"
    spec = importlib.util.spec_from_file_location("continuous_batching_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def model():
    env = ShardingEnv(make_mesh({"data": 1}, devices=jax.devices()[:1]))
    module, params, _ = create_model(CFG, jax.random.key(0), env)
    return module, params


def assert_same_rollout(got, want):
    for name in FIELDS:
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)), err_msg=name)
    for name in ("logprobs", "raw_logprobs"):
        np.testing.assert_allclose(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)), atol=1e-5,
                                   err_msg=name)


@pytest.mark.parametrize("sc, slots", [
    (SamplingConfig(max_new_tokens=24, n_samples=3, eos_token_ids=(1, 2, 5)), 4),  # segmented static cache
    (SamplingConfig(max_new_tokens=40, n_samples=2, eos_token_ids=(1, 2), top_k=12, top_p=0.9,
                    cache_segments=1), 3),
    (SamplingConfig(max_new_tokens=16, temperature=0.0, eos_token_ids=(4, 9)), 2),  # greedy, one sample
    (SamplingConfig(max_new_tokens=12, n_samples=4, temperature=0.7), 1),  # no EOS; one slot
])
def test_continuous_batching_gives_the_static_batchs_rollout(model, sc, slots):
    module, params = model
    key = jax.random.key(3)
    want = make_sampler(module, CFG, sc)(params, PROMPTS, PMASK, key)
    got = make_sampler(module, CFG, sc.replace(slots=slots))(params, PROMPTS, PMASK, key)
    assert_same_rollout(got, want)
    lengths = np.asarray(want.lengths)
    assert len(set(lengths.tolist())) > 1 or sc.eos_token_ids == ()  # the case has uneven lengths
    # every slot busy until the queue empties: never more steps than the chunked static batch would run
    assert int(got.num_steps) >= -(-lengths.sum() // slots)


def test_a_rows_tokens_depend_on_its_row_prompt_and_key_only(model):
    module, params = model
    sc = SamplingConfig(max_new_tokens=10, n_samples=2, top_k=20)
    key = jax.random.key(9)
    a = make_sampler(module, CFG, sc)(params, PROMPTS[:3], PMASK[:3], key)
    other = PROMPTS.copy()
    other[1:3] = PROMPTS[3:5]
    b = make_sampler(module, CFG, sc)(params, other[:3], PMASK[[0, 3, 4]], key)
    np.testing.assert_array_equal(np.asarray(a.tokens)[:2], np.asarray(b.tokens)[:2])  # prompt 0's two rows
    assert not np.array_equal(np.asarray(a.tokens)[2:], np.asarray(b.tokens)[2:])
    c = make_sampler(module, CFG, sc)(params, PROMPTS[:3], PMASK[:3], jax.random.key(10))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def simulate(lengths, slots):
    """(loop iterations, slot-steps) of the slot schedule: requests admitted in order into free slots; each
    iteration every busy slot decodes one token; a slot whose request reaches its length takes the next one
    at once; with nothing pending, the busy slots move to a batch half as wide while they fit (tail_widths)."""
    widths = list(tail_widths(slots))
    pending, busy, steps, slot_steps = list(lengths), [], 0, 0
    while pending or busy:
        while pending and len(busy) < widths[0]:
            busy.append(pending.pop(0))
        while not pending and len(widths) > 1 and len(busy) <= widths[1]:
            widths.pop(0)
        steps += 1
        slot_steps += widths[0]
        busy = [b - 1 for b in busy if b > 1]
    return steps, slot_steps


def test_slot_schedule_and_utilisation_follow_the_stop_lengths(model):
    module, params = model
    sc = SamplingConfig(max_new_tokens=20, n_samples=2, eos_token_ids=())
    lengths = np.array([3, 20, 1, 7, 7, 2, 15, 4, 9, 1], np.int32)
    key = jax.random.key(1)
    static = make_sampler(module, CFG, sc)(params, PROMPTS, PMASK, key, lengths)
    assert int(static.num_steps) == 20 and int(static.slot_steps) == 20 * 10
    assert slot_utilisation(static) == pytest.approx(lengths.sum() / 200)
    for slots in (3, 4, 8):  # 4 -> widths 4, 2; 8 -> 8, 4, 2, 1
        got = make_sampler(module, CFG, sc.replace(slots=slots))(params, PROMPTS, PMASK, key, lengths)
        assert_same_rollout(got, static)
        np.testing.assert_array_equal(np.asarray(got.lengths), lengths)
        assert not np.asarray(got.finished).any()  # a stop length is not an EOS
        steps, slot_steps = simulate(lengths.tolist(), slots)
        assert (int(got.num_steps), int(got.slot_steps)) == (steps, slot_steps), slots
        assert slot_utilisation(got) == pytest.approx(lengths.sum() / slot_steps)
    assert tail_widths(64) == (64, 32, 16, 8) and tail_widths(6) == (6, 3) and tail_widths(7) == (7,)


def test_long_tailed_lengths_keep_the_slots_busy(model):
    """The benchmark's schedule (median at 1/8 of the limit, 5% at the limit): 512 completions through 64 slots
    keep at least 90% of the decoded slot-steps useful; a static batch wastes most of them."""
    module, params = model
    lengths = _bench().long_tail_lengths(512, 96)
    assert np.median(lengths) <= 96 / 8 + 1 and np.mean(lengths == 96) == pytest.approx(0.05, abs=0.01)
    prompts, pmask = np.tile(PROMPTS, (26, 1))[:128], np.tile(PMASK, (26, 1))[:128]
    sc = SamplingConfig(max_new_tokens=96, n_samples=4, eos_token_ids=(), slots=64)
    got = make_sampler(module, CFG, sc)(params, prompts, pmask, jax.random.key(0), lengths)
    np.testing.assert_array_equal(np.asarray(got.lengths), lengths)
    u = slot_utilisation(got)
    static_chunks = sum(int(lengths[i:i + 64].max()) for i in range(0, 512, 64))
    print(f"utilisation {u:.3f}, static batch of 64 rows {lengths.sum() / (64 * static_chunks):.3f}")
    assert u >= 0.9
    assert lengths.sum() / (64 * static_chunks) < 0.5


def test_compiled_once_for_every_key_and_stop_lengths(model):
    module, params = model
    sampler = make_sampler(module, CFG, SamplingConfig(max_new_tokens=8, n_samples=2, slots=3))
    for seed in range(3):
        sampler(params, PROMPTS, PMASK, jax.random.key(seed), np.full(10, 2 + seed, np.int32))
    assert sampler._cache_size() == 1


def test_sharded_continuous_batching_equals_one_device(model, devices):
    module, params = model
    from jaxrl_llm.models import init_fn_for
    from jaxrl_llm.sharding.params import param_shardings
    sc = SamplingConfig(max_new_tokens=12, n_samples=4, eos_token_ids=(3, 7), top_k=16, slots=8)
    want = make_sampler(module, CFG, sc.replace(slots=0))(params, PROMPTS[:4], PMASK[:4], jax.random.key(11))
    env = ShardingEnv(make_mesh({"data": 8}, devices=devices))
    _, shardings = param_shardings(init_fn_for(module), env)
    got = make_sampler(module, CFG, sc, env=env, param_shardings=shardings)(
        jax.device_put(params, shardings), PROMPTS[:4], PMASK[:4], jax.random.key(11))
    assert len(got.tokens.sharding.device_set) == 8
    assert_same_rollout(got, want)


def test_slots_config_key_reaches_the_sampler_and_the_memory_estimate():
    from jaxrl_llm.train import build
    from jaxrl_llm.train.stages.rl import sampling_section
    with pytest.raises(ConfigError, match="slots"):
        SamplingConfig(slots=-1)
    sc = sampling_section(32)
    sc.slots = 6
    comp = types.SimpleNamespace(module=None, model_cfg=CFG, eos_ids=(1,), pad_id=0, env=None, shardings=None)
    comp.module = create_model(CFG, jax.random.key(0), ShardingEnv(make_mesh({"data": 1},
                                                                             devices=jax.devices()[:1])))[0]
    sampling, _ = build.stage_sampler(comp, sc, 4)
    assert sampling.slots == 6


@pytest.mark.parametrize("spec, key, match", [
    ("tool_calculator.py:smoke", "rl.sampling.slots=4", "multi-turn episodes decode in a static batch"),
    ("expert_iteration.py:smoke", "ei.sampling.slots=4", "step search decodes its beams in lockstep"),
])
def test_slots_refused_where_a_stage_would_not_read_it(spec, key, match):
    from jaxrl_llm.train.config import load_experiment
    from jaxrl_llm.train.validation import check_config
    root = pathlib.Path(__file__).resolve().parents[1] / "experiments"
    overrides = [key] + (["ei.search.method=beam"] if spec.startswith("expert") else [])
    try:
        cfg = load_experiment(str(root / spec), overrides)
        check_config(cfg)
    except ConfigError as e:
        assert match in str(e) and "slots" in str(e), e
    else:
        pytest.fail(f"{key} was accepted")
