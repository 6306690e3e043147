"""LoRA adapters (models/lora.py): exact at init, merged export, only adapters train, every stage kind, resume,
config errors, sharding and the memory estimate."""

import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxrl_llm.algos import grpo
from jaxrl_llm.algos.train_state import OptimizerConfig, TrainState, jit_update
from jaxrl_llm.errors import ConfigError
from jaxrl_llm.models import CausalLM, get_preset, load_hf, save_hf
from jaxrl_llm.models import lora
from jaxrl_llm.models.api import init_fn_for
from jaxrl_llm.sharding import ShardingEnv, make_mesh
from jaxrl_llm.sharding.params import init_sharded
from jaxrl_llm.tasks import RewardOutput, register_task, registered_tasks
from jaxrl_llm.tasks.arithmetic import ArithmeticTask
from jaxrl_llm.train.config import (base_config, dpo_stage, grpo_stage, load_experiment, ppo_stage,
                                    reward_model_stage, sft_stage)
from jaxrl_llm.train.memory import estimate_memory
from jaxrl_llm.train.trainer import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE = get_preset("dummy")
SPEC = lora.LoraConfig(rank=4, alpha=8.0)
LCFG = BASE.replace(lora=SPEC)


def _env(axes=None):
    axes = axes or {"data": 1}
    n = int(np.prod(list(axes.values())))
    return ShardingEnv(make_mesh(axes, devices=jax.devices()[:n]))


def _tokens():
    rng = np.random.default_rng(0)
    toks = rng.integers(3, BASE.vocab_size, (2, 7)).astype(np.int32)
    mask = np.ones((2, 7), bool)
    mask[1, :2] = False  # left padding
    return jnp.asarray(toks), jnp.asarray(mask)


@pytest.fixture(scope="module")
def base_and_adapters():
    env = _env()
    base = init_sharded(init_fn_for(CausalLM(BASE)), jax.random.key(0), env)[0]
    adapters = lora.init_adapters(CausalLM(LCFG), jax.random.key(1), env)
    return env, base, adapters


def _logits(cfg, params):
    toks, mask = _tokens()
    return np.asarray(CausalLM(cfg).apply({"params": params}, toks, None, mask)[0])


def test_fresh_adapters_give_exactly_the_base_logits(base_and_adapters):
    _, base, adapters = base_and_adapters
    q = adapters["model"]["layers"]["self_attn"]["q_proj"]
    assert q["lora_a"].shape == (BASE.num_layers, BASE.hidden_size, 4)
    assert q["lora_b"].shape == (BASE.num_layers, 4, BASE.num_heads, BASE.head_dim)
    o = adapters["model"]["layers"]["self_attn"]["o_proj"]
    assert o["lora_a"].shape == (BASE.num_layers, BASE.num_heads, BASE.head_dim, 4)
    bs = [x for p, x in jax.tree_util.tree_flatten_with_path(adapters)[0] if "lora_b" in jax.tree_util.keystr(p)]
    assert len(bs) == 7 and not any(np.any(np.asarray(b)) for b in bs)  # every B is zero
    a = np.asarray(q["lora_a"])
    assert np.any(a) and np.abs(a).max() <= 1 / np.sqrt(BASE.hidden_size)  # PEFT's kaiming-uniform bound
    full = lora.merge_trees(adapters, base)
    np.testing.assert_array_equal(_logits(LCFG, full), _logits(BASE, base))
    # the same module without the adapter leaves is the base model (the reference policy's forward)
    np.testing.assert_array_equal(_logits(LCFG, base), _logits(BASE, base))


def test_targets_select_projections(base_and_adapters):
    env = base_and_adapters[0]
    cfg = BASE.replace(lora=lora.LoraConfig(rank=2, targets=("q_proj", "v_.*")))
    ad = lora.init_adapters(CausalLM(cfg), jax.random.key(1), env)
    assert sorted(ad["model"]["layers"]["self_attn"]) == ["q_proj", "v_proj"]
    assert "mlp" not in ad["model"]["layers"]
    assert lora.resolve_targets(("mlp",)) == ("gate_proj", "up_proj", "down_proj")


def _perturbed(adapters, seed=3):
    """Adapters with non-zero B (a trained-looking adapter)."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(adapters)
    rng = np.random.default_rng(seed)
    out = [x if "lora_a" in jax.tree_util.keystr(p) else jnp.asarray(rng.normal(0, 0.05, x.shape), x.dtype)
           for p, x in leaves]
    return jax.tree_util.tree_unflatten(tree, out)


def test_merged_export_equals_the_unmerged_forward(base_and_adapters, tmp_path):
    env, base, adapters = base_and_adapters
    full = lora.merge_trees(_perturbed(adapters), base)
    unmerged = _logits(LCFG, full)
    assert np.abs(unmerged - _logits(BASE, base)).max() > 1e-3  # the adapters do change the model
    save_hf(full, LCFG, tmp_path / "hf")
    cfg2, params2 = load_hf(tmp_path / "hf", env)
    assert cfg2.lora is None and not lora.has_adapters(params2)
    np.testing.assert_allclose(_logits(cfg2, params2), unmerged, rtol=0, atol=2e-5)


def test_lora_grpo_step_trains_only_adapters(base_and_adapters):
    """A GRPO step with a KL term (reference = the frozen base, adapters off) and adapter dropout: the base
    is bitwise unchanged, the adapters move, the optimizer state has adapter shapes only."""
    env, base, _ = base_and_adapters
    spec = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1)
    cfg = BASE.replace(lora=spec, remat="full")  # dropout keys through the rematerialised layer scan
    module = CausalLM(cfg)
    adapters = lora.init_adapters(module, jax.random.key(5), env)
    trainable, frozen = lora.prepare(base, adapters, spec)
    base_before = jax.tree.map(np.asarray, frozen)
    state = TrainState.create(trainable, OptimizerConfig(learning_rate=1e-2))
    state = state.replace(frozen=frozen)
    algo = grpo.grpo(group_size=2, beta=0.04)
    toks, mask = _tokens()
    rng = np.random.default_rng(1)
    comp = jnp.asarray(rng.integers(3, BASE.vocab_size, (4, 5)).astype(np.int32))
    batch = {"prompt_tokens": jnp.repeat(toks, 2, 0), "prompt_mask": jnp.repeat(mask, 2, 0),
             "completion_tokens": comp, "completion_mask": jnp.ones((4, 5), jnp.int32)}
    logp = jax.jit(grpo.make_logprob_fn(module, cfg, algo.temperature, algo.logprob_chunk))
    batch["ref_logprobs"] = logp(state.frozen, batch)  # the reference: the base, no second copy
    np.testing.assert_array_equal(np.asarray(batch["ref_logprobs"]), np.asarray(logp(state.model_params(), batch)))
    batch["advantages"] = grpo.compute_advantages(algo, jnp.asarray([1.0, 0.0, 0.0, 1.0]), batch["completion_mask"])
    update = jit_update(grpo.make_grpo_step(module, cfg, algo), state, batch, env)
    new, metrics = update(state, batch, jax.random.key(0))
    new, metrics = update(new, batch, jax.random.key(1))
    assert float(metrics["skipped"]) == 0 and float(metrics["grad_norm"]) > 0
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, new.frozen), base_before)
    b = new.params["model"]["layers"]["self_attn"]["q_proj"]["lora_b"]
    assert np.any(np.asarray(b)) and float(metrics["kl_ref"]) != 0  # B moved off zero: the policy left the base
    adapter_shapes = {tuple(x.shape) for x in jax.tree.leaves(adapters)}
    moments = [x for x in jax.tree.leaves(new.opt_state) if x.ndim]
    assert moments and {tuple(x.shape) for x in moments} <= adapter_shapes
    assert sum(x.size for x in moments) == 2 * lora.num_adapter_params(adapters)  # Adam's mu and nu


def test_adapters_are_sharded_like_their_kernels(devices):
    env = _env({"data": 2, "fsdp": 2, "tensor": 2})
    ad = lora.init_adapters(CausalLM(LCFG), jax.random.key(1), env)
    q = ad["model"]["layers"]["self_attn"]["q_proj"]
    down = ad["model"]["layers"]["mlp"]["down_proj"]
    spec = lambda x: tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))  # noqa: E731
    assert spec(q["lora_a"]) == (None, "fsdp", None)                # [layers, embed, r]
    assert spec(q["lora_b"]) == (None, None, "tensor", None)        # [layers, r, heads, head_dim]
    assert spec(down["lora_a"]) == (None, "tensor", None)           # [layers, mlp, r]
    assert spec(down["lora_b"]) == (None, None, "fsdp")             # [layers, r, embed]
    # a sharded LoRA forward equals the single-device one
    base = init_sharded(init_fn_for(CausalLM(BASE)), jax.random.key(0), env)[0]
    full = lora.merge_trees(_perturbed(ad), base)
    with env.activate():
        sharded = jax.jit(lambda p: CausalLM(LCFG).apply({"params": p}, *_tokens()[:1], None, _tokens()[1])[0])(full)
    single = _logits(LCFG, jax.device_put(jax.device_get(full), jax.devices()[0]))
    np.testing.assert_allclose(np.asarray(sharded), single, rtol=0, atol=2e-5)


@pytest.mark.parametrize("key,value,needle", [
    ("targets", ("q_proj", "qproj"), "config.model.lora.targets: 'qproj' matches no projection; valid names: "
                                     "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
    ("targets", (), "config.model.lora.targets is empty"),
    ("rank", -1, "config.model.lora.rank=-1 is out of range"),
    ("alpha", 0.0, "config.model.lora.alpha=0.0 is out of range"),
    ("dropout", 1.0, "config.model.lora.dropout=1.0 is out of range"),
    ("base_dtype", "fp8", "config.model.lora.base_dtype='fp8' is not a dtype name"),
])
def test_bad_lora_values_are_one_line_errors(key, value, needle):
    cfg = load_experiment(str(ROOT / "experiments" / "demo.py") + ":smoke", ["model.lora.rank=4"])
    with cfg.unlocked():
        cfg.model.lora[key] = value
    from jaxrl_llm.train.validation import check_model_numerics
    with pytest.raises(ConfigError) as e:
        check_model_numerics(cfg.model)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_lora_keys_through_set():
    cfg = load_experiment(str(ROOT / "experiments" / "demo.py") + ":smoke",
                          ["model.lora.rank=8", "model.lora.alpha=32", "model.lora.base_dtype=bfloat16"])
    from jaxrl_llm.train.validation import lora_config
    spec = lora_config(cfg.model)
    assert (spec.rank, spec.scale, spec.base_dtype, spec.targets) == (8, 4.0, "bfloat16", lora.TARGETS)
    cfg = load_experiment(str(ROOT / "experiments" / "demo.py") + ":smoke",
                          ["model.lora.rank=2", "model.lora.targets=q_proj,v_.*,mlp"])
    assert lora_config(cfg.model).targets == ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
    with pytest.raises(ConfigError, match="unknown key 'model.lora.nope'"):
        load_experiment(str(ROOT / "experiments" / "demo.py") + ":smoke", ["model.lora.nope=1"])


def test_memory_estimate_counts_adapters_only_for_optimizer_and_gradients():
    c = base_config()
    c.model.preset = "qwen2.5-1.5b"
    c.stages = ("rl",)
    c.rl = grpo_stage("grpo", prompts_per_iter=2, group_size=2, max_new_tokens=16)
    c.eval.every = 0
    full = estimate_memory(c, get_preset("qwen2.5-1.5b"), {"data": 1}).stages[0].terms
    c.model.lora.rank, c.model.lora.base_dtype = 16, "bfloat16"
    lo = estimate_memory(c, get_preset("qwen2.5-1.5b"), {"data": 1}).stages[0].terms
    n = get_preset("qwen2.5-1.5b").num_params()
    assert full["optimizer"] == 2 * 4 * n and full["reference"] == full["input_params"] == 4 * n
    assert lo["reference"] == lo["input_params"] == 0
    adapter_bytes = lo["gradients"]
    assert 0 < adapter_bytes < 0.02 * 4 * n and lo["optimizer"] == 2 * adapter_bytes
    assert lo["params"] == 2 * n + adapter_bytes  # the frozen base in bfloat16, the adapters in float32


# ----------------------------------------------------------------------------- through the trainer

ARITH = dict(min_digits=1, max_digits=2, operators=("+",), spaced=True, pad_operands=True, reverse_answer=True)


@dataclasses.dataclass(frozen=True)
class _LengthReward(ArithmeticTask):
    """Rewards by completion length, so a random model's rollouts get different rewards (RL stages learn)."""

    def reward(self, inputs) -> RewardOutput:
        scores = np.array([-abs(len(t) - 4) / 4 for t in inputs.completions], np.float32)
        return RewardOutput(scores=scores, components={"length": scores},
                            correct=np.zeros(len(inputs.completions), bool))


if "arithmetic_length_lora" not in registered_tasks():
    register_task("arithmetic_length_lora")(_LengthReward)


def _config(run_root, stages):
    c = base_config()
    c.name = "lora"
    c.run_root = str(run_root)
    c.model.preset = "dummy"
    c.model.lora.rank, c.model.lora.alpha = 4, 8.0
    c.task.name = "arithmetic_length_lora"
    c.task.kwargs = mc.ConfigDict(ARITH)
    c.eval.every = 0
    c.log.every, c.log.progress, c.log.tensorboard, c.log.samples_every = 1, False, False, 0
    c.checkpoint.every = 0
    c.stages = tuple(stages)
    for name, section in stages.items():
        c[name] = section
    return c


def _pairs(section):
    section.data.num_pairs, section.data.eval_pairs = 32, 8
    return section


def _state(run_dir, stage, step=None):
    ck = run_dir / "checkpoints" / stage
    step = step or max(int(p.name) for p in ck.iterdir() if p.name.isdigit())
    state = ocp.StandardCheckpointer().restore(ck / str(step) / "state")
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def test_every_stage_kind_trains_with_lora(tmp_path):
    """SFT, reward model, DPO, GRPO (KL to the frozen base) and PPO (shared backbone, value head and reward
    from the LoRA reward model) run with adapters; each checkpoint holds adapters and heads only."""
    grpo_s = grpo_stage("grpo", iterations=2, prompts_per_iter=2, group_size=2, learning_rate=1e-3,
                        max_new_tokens=4, beta=0.04)
    ppo_s = ppo_stage(iterations=2, prompts_per_iter=2, samples_per_prompt=2, learning_rate=1e-3, max_new_tokens=4,
                      kl_coef=0.05, shared_backbone=True)
    ppo_s.reward_model_stage, ppo_s.value_init, ppo_s.reward.source = "rm", "reward_model", "reward_model"
    for s in (grpo_s, ppo_s):
        s.max_prompt_len, s.reward.in_jit = 12, False
    stages = {"sft": sft_stage(steps=2, batch_size=4, learning_rate=1e-3, max_prompt_len=12, max_response_len=4),
              "rm": _pairs(reward_model_stage(steps=2, batch_size=4, learning_rate=1e-3, max_prompt_len=12,
                                              max_response_len=4)),
              "dpo": _pairs(dpo_stage("sigmoid", steps=2, batch_size=4, learning_rate=1e-3, max_prompt_len=12,
                                      max_response_len=4, beta=0.1)),
              "grpo": grpo_s, "ppo": ppo_s}
    cfg = _config(tmp_path, stages)
    cfg.model.lora.base_dtype = "bfloat16"  # no dropout here: the sampler/trainer log-prob check below is exact
    train(cfg)
    run_dir = tmp_path / "lora"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for name in stages:
        got = [r for r in rows if r["stage"] == name and "loss" in r]
        assert len(got) == 2 and all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in got), name
        arrays = _state(run_dir, name)
        params = [k for k in arrays if not k.startswith("['opt_state']") and k != "['step']"]
        head = ("score", "['value_params']['kernel']", "['value_params']['bias']")  # PPO's shared value head
        assert params and all("lora_" in k or any(h in k for h in head) for k in params), (name, params[:5])
        assert any("lora_b" in k and np.any(arrays[k]) for k in params), name  # the adapters trained
    grpo_rows = [r for r in rows if r["stage"] == "grpo" and "loss" in r]
    assert grpo_rows[-1]["kl_ref"] > 1e-9  # the policy left the frozen base, its reference
    # the sampler applies the adapters: its log-probs match the trained forward's after the first update
    assert all(r["mismatch_abs"] < 1e-4 for r in grpo_rows)
    assert any("['value_params']" in k for k in _state(run_dir, "ppo"))


def test_lora_resume_is_bitwise_exact(tmp_path):
    """SFT then PPO (separate LoRA value model on the shared base, adaptive KL, dropout, bfloat16 base):
    resumed from its step-2 checkpoint, PPO's step-4 state equals the uninterrupted run's bit for bit (the
    base is rebuilt from the preset, the seed and the finished SFT stage's adapters)."""
    ppo_s = ppo_stage(iterations=4, prompts_per_iter=2, samples_per_prompt=2, learning_rate=1e-3,
                      max_new_tokens=4, kl_coef=0.05, kl_target=1.0)
    ppo_s.max_prompt_len, ppo_s.reward.in_jit = 12, False
    stages = {"sft": sft_stage(steps=2, batch_size=4, learning_rate=1e-3, max_prompt_len=12, max_response_len=4),
              "ppo": ppo_s}
    cfg = _config(tmp_path / "a", stages)
    cfg.checkpoint.every, cfg.checkpoint.keep = 2, 5
    cfg.model.lora.dropout, cfg.model.lora.base_dtype = 0.1, "bfloat16"
    train(cfg)
    first = _state(tmp_path / "a" / "lora", "ppo", 4)
    assert set(_state(tmp_path / "a" / "lora", "ppo", 2)) == set(first)
    shutil.rmtree(tmp_path / "a" / "lora" / "checkpoints" / "ppo" / "4")  # as if stopped after step 2
    train(cfg)
    again = _state(tmp_path / "a" / "lora", "ppo", 4)
    assert set(again) == set(first)
    for k in first:
        np.testing.assert_array_equal(again[k], first[k], err_msg=k)
    assert any("['value_params']" in k and "lora_b" in k and np.any(first[k]) for k in first)
    # `jaxrl-llm eval` puts the checkpoint's adapters on the rebuilt base
    from jaxrl_llm.cli import evaluate_run
    _, info = evaluate_run(tmp_path / "a" / "lora", num_examples=8, max_new_tokens=4)
    assert (info["stage"], info["step"], info["final"]) == ("ppo", 4, True)
