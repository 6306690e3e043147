"""Vectorised seeds: S runs of a GRPO stage as one XLA program per iteration, `jax.vmap` over a seed axis.

    cfgs = [load_experiment("experiments/demo.py", (f"seed={s}", f"name=demo-vec/base-s{s}")) for s in range(4)]
    summaries = train_vectorised(cfgs)          # one summary per member, as `train(cfg)` returns it
    jaxrl-llm sweep experiments/demo.py --seeds 4 --vectorise
    jaxrl-llm sweep experiments/demo.py --seeds 2 --grid rl.optimizer.learning_rate=1e-4,3e-4 --vectorise

The members are configs that differ only in `seed` and `name` and, at most, in the learning rate of the
last stage (`<stage>.optimizer.learning_rate`). What runs:

* every stage before the last one (the demo's SFT warm start) runs per member, one after another, exactly
  as `jaxrl-llm train` runs it (same code, same run directory, checkpoints, metrics);
* the last stage, a `grpo` stage, runs for all members at once. Each member keeps its own GRPOStage
  object for the host side: prompt iterator, prompt encoding, the reward's targets, RewardWatch, logging,
  held-out evaluation, checkpoints (every checkpoint.every iterations and at the end, each member's own,
  as Stage.run_stage writes them). One iteration of all members is one jitted program:
  `jit(shard_map(vmap(iteration)))` over a leading member axis, with parameters, optimiser states,
  reference policies, prompts and keys stacked. `iteration` is the stage's own computation: the pure decode
  function of its sampler (`rollout.sampler.decode_fn`), the task's in-jit reward, `experience.scored`,
  `GRPOLearner.update_batch` (old / reference log-probs, advantages) and the learner's epoch runner; the
  keys are the stage's (fold_in(fold_in(stage key, i), 0) to sample, `update_key(i)` to update).
* the member axis is split over the devices (the largest count <= jax.device_count() that divides S); each
  device runs vmap over its own members, single-device: there is no communication.

A learning-rate sweep enters as a traced array: the members' optimiser is the stage's with
learning_rate=1.0 and its updates are scaled by the member's learning rate inside the program (every
schedule here is linear in the learning rate, so this is the same update up to float rounding); the
optimiser state has the structure of a normal run's. The logged `learning_rate` is the member's.

Results equal S separate runs (`jaxrl-llm train EXP --set seed=s`) up to float rounding: a separate run
shards its batch over its mesh, a member runs on one device inside a batched program, so sums are added in
another order (docs/ablations.md, "Vectorised seeds", has the measured comparison).

What cannot be vectorised is refused with one line (`check_members`): a host-side reward (reward.in_jit=False,
a task without an in-jit reward, a reward model, process rewards), multi-turn environments and tools,
lessons, overlap (staleness or rollout devices), LoRA, several processes, a last stage that is not grpo,
members that differ in any other key, and resuming a partly finished vectorised stage (use --fresh).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrl_llm.algos.train_state import make_optimizer
from jaxrl_llm.train.config import ConfigError
from jaxrl_llm.train.experience import Experience, PromptBatch, encode_prompts, scored, step_metrics

AXIS = "seed"  # the mesh axis of the member dimension
_PER_MEMBER = ("seed", "name")  # keys that differ between members without changing the program


def lr_key(cfg: mc.ConfigDict) -> str:
    """The one key whose values a vectorised run can sweep: the last stage's learning rate."""
    return f"{cfg.stages[-1]}.optimizer.learning_rate"


def vectorisable_keys(cfg: mc.ConfigDict) -> tuple[str, ...]:
    return (lr_key(cfg),)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def check_stage(cfg: mc.ConfigDict) -> None:
    """Raises ConfigError (one line) when the last stage of `cfg` cannot run vectorised (module docstring)."""
    from jaxrl_llm.tasks import get_task
    from jaxrl_llm.tasks.base import has_in_jit_reward
    from jaxrl_llm.train.stages.episodes import has_env
    from jaxrl_llm.train.stages.overlap import settings

    name = cfg.stages[-1]
    s, where = cfg[name], f"config.{name}"
    no = "cannot be vectorised"
    if jax.process_count() > 1:
        raise ConfigError(f"--vectorise runs in one process ({jax.process_count()} processes here); run the "
                          "process sweep (without --vectorise) on a multi-process setup")
    if s.kind != "grpo":
        raise ConfigError(f"{where}.kind={s.kind!r}: only a grpo stage can be vectorised (the last stage is; the "
                          "ones before it run per seed); run the sweep without --vectorise")
    if s.reward.get("source", "task") != "task":
        raise ConfigError(f"{where}.reward.source={s.reward.source!r}: a reward model scores on the host and "
                          f"{no}; run the sweep without --vectorise")
    task = get_task(cfg.task.name, **cfg.task.kwargs.to_dict())
    if not (s.reward.in_jit and has_in_jit_reward(task)):
        why = (f"{where}.reward.in_jit=False" if not s.reward.in_jit
               else f"task {cfg.task.name!r} (with these task.kwargs) has no in-jit reward")
        raise ConfigError(f"{why}: a host-side reward {no} (only the in-jit reward runs inside the program); "
                          "run the sweep without --vectorise")
    p = s.get("process_reward")
    if p is not None and p.source != "none":
        raise ConfigError(f"{where}.process_reward.source={p.source!r}: process rewards are computed on the host "
                          f"and {no}; run the sweep without --vectorise")
    if has_env(s):
        raise ConfigError(f"{where}.env.name={s.env.name!r}: multi-turn episodes (tools, environments) run on the "
                          f"host between turns and {no}; run the sweep without --vectorise")
    if s.get("lessons"):
        raise ConfigError(f"{where}.lessons={s.lessons!r}: lessons {no}; run the sweep without --vectorise")
    staleness, rollout_devices = settings(s)
    if staleness or rollout_devices:
        raise ConfigError(f"{where}.overlap (staleness={staleness}, rollout_devices={rollout_devices}): overlapped "
                          f"rollouts {no}; set {name}.overlap.staleness=0 and rollout_devices=0, or run the sweep "
                          "without --vectorise")
    if int(cfg.model.lora.rank) > 0:
        raise ConfigError(f"config.model.lora.rank={cfg.model.lora.rank}: LoRA {no}; run the sweep without "
                          "--vectorise")


def check_members(cfgs: Sequence[mc.ConfigDict]) -> str | None:
    """Checks that `cfgs` can run as one vectorised program; returns the swept key (None: seeds only).
    Raises ConfigError naming the first key that differs and cannot be vectorised."""
    if not cfgs:
        raise ConfigError("train_vectorised: no members (give at least one config)")
    check_stage(cfgs[0])
    flat = [_flat(c.to_dict()) for c in cfgs]
    allowed = vectorisable_keys(cfgs[0])
    swept = None
    for key in sorted(set().union(*flat)):
        values = {repr(f.get(key)) for f in flat}
        if len(values) == 1 or key in _PER_MEMBER:
            continue
        if key not in allowed:
            raise ConfigError(f"--vectorise: config.{key} differs between the runs ({', '.join(sorted(values))}); "
                              f"only seed and {', '.join(allowed)} can vary in one vectorised program (another "
                              "key changes the program); run the sweep without --vectorise")
        swept = key
    names = [c.name for c in cfgs]
    if len(set(names)) < len(names):
        raise ConfigError(f"--vectorise: two members share the run name {names}; give each its own name")
    return swept


# ----------------------------------------------------------------------------- running


def _run_stages_before(cfg: mc.ConfigDict, fresh: bool) -> tuple[Any, Any, Any, dict, float, bool]:
    """(components, run dir, params, summary, seconds, finished_before): the stages before the last one,
    run as `trainer.train` runs them."""
    from jaxrl_llm.train.build import build
    from jaxrl_llm.train.config import check
    from jaxrl_llm.train.run_dir import RunDir
    from jaxrl_llm.train.trainer import run_one_stage

    t0 = time.time()
    check(cfg)
    run = RunDir(cfg.run_root, cfg.name, cfg, fresh=fresh)
    try:
        comp, params = build(cfg)
        summary: dict[str, Any] = {"name": cfg.name, "run_dir": str(run.path)}
        stages = tuple(cfg.stages)
        finished = True
        for index, name in enumerate(stages[:-1]):
            stage, params = run_one_stage(cfg, comp, run, stages, index, params)
            finished = finished and stage.finished_before
            summary.update({f"{name}/{k}": v for k, v in stage.summary.items()})
    except BaseException:
        run.close()
        raise
    return comp, run, params, summary, time.time() - t0, finished


def _member_devices(s: int) -> list:
    """The devices the member axis is split over: the largest count <= device_count that divides s."""
    devices = jax.devices()
    d = max(k for k in range(1, min(s, len(devices)) + 1) if s % k == 0)
    return devices[:d]


def _scaled(tx: optax.GradientTransformation, factor: jax.Array) -> optax.GradientTransformation:
    """`tx` whose updates are multiplied by `factor` (a traced learning rate); the same state."""
    def update(grads, state, params=None):
        updates, state = tx.update(grads, state, params)
        return jax.tree.map(lambda u: u * factor.astype(u.dtype), updates), state
    return optax.GradientTransformation(tx.init, update)


def make_iteration(stage, lr_traced: bool) -> Callable:
    """The stage's iteration for one member, pure: (state, ref, tokens, mask, truncated, targets, lengths,
    sample key, update key, lr) -> (state, metrics, rollout, rewards, correct). `lr_traced`: updates scaled by
    `lr` (the state's tx then has learning rate 1.0)."""
    from jaxrl_llm.rollout.sampler import decode_fn

    comp, learner, n = stage.comp, stage.learner, stage.n
    decode = decode_fn(comp.module, comp.model_cfg, stage.sampling)
    reward_fn, correct_score = stage.scorer.jax_reward, stage.scorer.reward.correct_score
    keep = bool(stage.algo.filter_zero_std_groups)

    def iteration(state, ref, tokens, mask, truncated, targets, lengths, sample_key, update_key, lr):
        ro = decode(state.model_params(), tokens, mask, sample_key)
        rewards = reward_fn(ro.tokens, ro.mask, targets, lengths)
        exp = scored(ro, PromptBatch(tokens, mask, [], truncated), rewards, rewards >= correct_score, {}, n,
                     keep_groups_with_signal=keep)
        batch = learner.update_batch(state, ref, exp)
        tx = state.tx
        if lr_traced:
            state = state.replace(tx=_scaled(tx, lr))
        state, stacked = learner.step_fn(state, batch, update_key)
        metrics = step_metrics(stacked)
        if lr_traced and "learning_rate" in metrics:
            metrics["learning_rate"] = metrics["learning_rate"] * lr
        metrics = {**metrics, **exp.metrics}
        return state.replace(tx=tx), metrics, ro, rewards, exp.correct

    return iteration


class _Member:
    """One member's host side: its components, run directory and GRPOStage."""

    def __init__(self, cfg, fresh: bool):
        self.cfg = cfg
        self.comp, self.run, params, self.summary, self.seconds, self.finished_before = \
            _run_stages_before(cfg, fresh)
        try:
            self._start(params)
        except BaseException:
            self.run.close()
            raise

    def _start(self, params) -> None:
        from jaxrl_llm.train.checkpoint import Checkpointer
        from jaxrl_llm.train.trainer import stage_class
        cfg = self.cfg
        stages = tuple(cfg.stages)
        self.name, index = stages[-1], len(stages) - 1
        self.stage = stage_class(cfg[self.name].kind)(self.comp, self.run, self.name, index, stages[:index])
        self.ck = Checkpointer(self.run.checkpoint_dir(self.name), max_to_keep=cfg.checkpoint.keep,
                               async_save=cfg.checkpoint.async_save)
        self.stage.init(params)
        self.done = False
        latest = self.ck.latest_step()
        if latest is not None:
            tree, meta = self.stage._restore_checkpoint(self.ck, latest)
            if not meta.get("done"):
                raise ConfigError(f"{self.run.path}: stage {self.name!r} stopped at step {latest} of a vectorised "
                                  "run; a vectorised stage does not resume: run the sweep again with --fresh")
            self.stage.summary = dict(meta.get("summary", {}))
            self.done = True
        self.skips = 0  # steps in a row with a non-finite loss or gradient

    def close(self) -> None:
        self.ck.close()
        self.stage.close()
        self.run.close()


def _stack(trees: Sequence[Any], sharding) -> Any:
    leaves = [jax.tree.leaves(t) for t in trees]
    stacked = [jax.device_put(np.stack([np.asarray(x) for x in xs]), sharding) for xs in zip(*leaves)]
    return jax.tree.unflatten(jax.tree.structure(trees[0]), stacked)


def _member_tree(tree: Any, s: int, like: Any, shardings: Any) -> Any:
    """Member `s` of a stacked tree, in the structure of `like`, placed on `shardings`."""
    leaves = [jax.device_put(np.asarray(x[s]), sh) for x, sh in zip(jax.tree.leaves(tree),
                                                                      jax.tree.leaves(shardings))]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def train_vectorised(cfgs: Sequence[mc.ConfigDict], *, fresh: bool = False,
                     say: Callable[[str], None] = lambda text: None) -> list[dict[str, Any]]:
    """Runs the members `cfgs` (see the module docstring); returns each member's summary (summary.json)."""
    swept = check_members(cfgs)
    members: list[_Member] = []
    try:
        for cfg in cfgs:
            members.append(_Member(cfg, fresh))
        pending = [m for m in members if not m.done]
        if pending and len(pending) < len(members):
            raise ConfigError(f"{len(members) - len(pending)} of {len(members)} runs finished their last stage "
                              "before and the others did not: run the sweep again with --fresh")
        t0 = time.time()
        if pending:
            _train_stage(members, swept, say)
        seconds = time.time() - t0
        return [_finish(m, seconds) for m in members]
    finally:
        for m in members:
            m.close()


def _finish(m: _Member, stage_seconds: float) -> dict[str, Any]:
    summary = dict(m.summary)
    summary.update({f"{m.name}/{k}": v for k, v in m.stage.summary.items()})
    saved = m.run.path / "summary.json"
    if m.done and m.finished_before and saved.is_file():
        import json
        return json.loads(saved.read_text())
    summary["wall_time_s"] = round(m.seconds + stage_seconds, 1)
    summary["vectorised"] = 1
    m.run.write_summary(summary)
    if m.run.writer:
        try:
            from jaxrl_llm.train.plots import plot_run
            summary["plots"] = [str(p) for p in plot_run(m.run.path)]
        except ImportError:
            pass
    return summary


def _host_inputs(m: _Member, i: int, width: int) -> tuple:
    """Member `m`'s iteration-i prompts as the stage's `experience` reads them: (tokens, mask, truncated,
    targets padded with -1 to `width`, target lengths, examples)."""
    st = m.stage
    examples = st.with_lessons(next(st.iterator))
    prompts = encode_prompts(st.comp.tokenizer, st.comp.env, examples, int(st.section.max_prompt_len), st.prompts,
                             chat=st.comp.chat)
    rows = [e for e in examples for _ in range(st.n)]  # row r of the rollout answers prompt r // n
    targets, lengths = st.scorer.reward.encode_targets(rows)
    targets = np.pad(targets, ((0, 0), (0, width - targets.shape[1])), constant_values=-1)
    return (np.asarray(prompts.tokens), np.asarray(prompts.mask), np.int32(prompts.num_truncated), targets,
            np.asarray(lengths), examples)


def _train_stage(members: list[_Member], swept: str | None, say: Callable[[str], None]) -> None:
    import dataclasses

    from jaxrl_llm.algos.train_state import make_schedule
    from jaxrl_llm.train.stage import NonFiniteError

    first = members[0]
    stage0, cfg = first.stage, first.cfg
    total = stage0.total_steps
    devices = _member_devices(len(members))
    mesh = Mesh(np.array(devices), (AXIS,))
    spread = NamedSharding(mesh, PartitionSpec(AXIS))
    lr_traced = swept is not None
    for m in members:  # held-out accuracy before the stage, as Stage.run_stage does
        m.run.rewind(m.name, 0, m.stage.stages_before)
        if m.cfg.eval.every > 0:
            ev = m.stage._log_eval(0)
            m.stage.summary["accuracy_before"] = ev.get("eval/accuracy")
    like = stage0.state
    if lr_traced:  # the optimiser with learning rate 1.0; each member's rate scales its updates
        unit = dataclasses.replace(stage0.opt_cfg, learning_rate=1.0)
        like = like.replace(tx=make_optimizer(unit), schedule=make_schedule(unit))
    state = jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(_stack([m.stage.state for m in members],
                                                                                  spread)))
    refs = [m.stage.reference_params() for m in members]
    ref = None if refs[0] is None else _stack(refs, spread)
    layout = []  # per member: (state like, state shardings, ref like, ref shardings) to unstack into
    for m, r in zip(members, refs):
        st_like = m.stage.state
        layout.append((st_like, jax.tree.map(lambda x: x.sharding, st_like), r,
                       None if r is None else jax.tree.map(lambda x: x.sharding, r)))
        m.stage.state = m.stage.ref = None  # the stacked copies are the ones trained
    lrs = jax.device_put(np.array([float(m.cfg[m.name].optimizer.learning_rate) for m in members], np.float32),
                         spread)
    width = max(m.stage.scorer.reward.encode_targets(m.stage.examples)[0].shape[1] for m in members)

    program = jax.jit(jax.shard_map(jax.vmap(make_iteration(stage0, lr_traced)), mesh=mesh,
                                    in_specs=PartitionSpec(AXIS), out_specs=PartitionSpec(AXIS), check_vma=False),
                      donate_argnums=(0,))
    say(f"vectorised stage {stage0.name!r}: {len(members)} run(s) x {total} iterations, one program per "
        f"iteration, the run axis over {len(devices)} device(s)")
    log_every, t_last, since = cfg.log.every, time.time(), 0
    for i in range(total):
        host = [_host_inputs(m, i, width) for m in members]
        inputs = [_stack([h[k] for h in host], spread) for k in range(5)]
        sample_keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(m.stage.key, i), 0)  # RLStage.experience
                                 for m in members])
        update_keys = jnp.stack([m.stage.update_key(i) for m in members])
        state, metrics, ro, rewards, correct = program(state, ref, *inputs, jax.device_put(sample_keys, spread),
                                                       jax.device_put(update_keys, spread), lrs)
        since += 1
        n = i + 1
        log_now = n % log_every == 0 or n == total
        fetched = jax.device_get((metrics, ro, rewards, correct))
        dt = time.time() - t_last
        for s, m in enumerate(members):
            met, ro_s, r_s, c_s = jax.tree.map(lambda x: x[s], fetched)
            exp = Experience({}, jax.tree.map(jnp.asarray, ro_s), host[s][5], jnp.asarray(r_s), jnp.asarray(c_s),
                             {}, m.stage.n)
            out = m.stage.iteration_metrics(i, exp, met)
            m.skips = m.skips + 1 if float(out.get("skipped", 0.0)) > 0 else 0
            if m.skips >= m.cfg.max_consecutive_skips:
                raise NonFiniteError(f"stage {m.name!r} of run {m.cfg.name!r}: {m.skips} consecutive steps had a "
                                     f"non-finite loss or gradient (last at step {n}); stopped. Lower the learning "
                                     "rate, check the data and rewards, or raise max_consecutive_skips")
            if log_now:
                record = {k: float(v) for k, v in out.items()}
                record["time/step_s"] = dt / max(since, 1)
                record["skipped_in_a_row"] = m.skips
                m.run.log_metrics(m.name, n, record)
        if log_now:
            t_last, since = time.time(), 0
        evaluate = cfg.eval.every > 0 and (n % cfg.eval.every == 0 or n == total)
        save = n == total or (cfg.checkpoint.every > 0 and n % cfg.checkpoint.every == 0)
        if not (evaluate or save):
            continue
        for s, m in enumerate(members):
            st, (st_like, st_sh, r_like, r_sh) = m.stage, layout[s]
            st.state = _member_tree(state, s, st_like, st_sh)
            if evaluate:
                ev = st._log_eval(n)
                if "eval/accuracy" in ev:
                    say(f"{m.cfg.name} {m.name} step {n}: held-out accuracy {ev['eval/accuracy']:.3f}")
            if n == total and "eval/accuracy" in st._last_eval:
                st.summary["accuracy_after"] = st._last_eval["eval/accuracy"]
            if save:  # as Stage.run_stage: every checkpoint.every steps, and the final one marked done
                if ref is not None:
                    st.ref = _member_tree(ref, s, r_like, r_sh)
                m.ck.save(n, st.tree(), st._checkpoint_meta(done=n == total))
                m.ck.wait()
            if n < total:
                st.state = st.ref = None


# ----------------------------------------------------------------------------- sweeps


def check_sweep(cfg: mc.ConfigDict, grid, jobs, env=None) -> None:
    """`sweep(..., vectorise=True)`: the grid may only hold the last stage's learning rate; no `jobs`, no `env`
    (there are no child processes)."""
    check_stage(cfg)
    allowed = vectorisable_keys(cfg)
    for key in grid:
        if key not in allowed:
            raise ConfigError(f"--vectorise with --grid {key}=...: only {', '.join(allowed)} can be swept inside "
                              "one vectorised program (another key changes the program); run the sweep without "
                              "--vectorise")
    if jobs is not None:
        raise ConfigError(f"--jobs {jobs} with --vectorise: a vectorised sweep runs in one process; drop --jobs")
    if env:
        raise ConfigError(f"sweep(env={dict(env)}) with vectorise=True: there are no child processes to give "
                          "environment variables; set them in this process instead")


def run_sweep(spec: str, runs: Sequence[Any], *, fresh: bool = False,
              say: Callable[[str], None] = lambda text: None, cache_dir: str | None = None) -> None:
    """Runs a sweep's `runs` (`sweep.RunResult`: overrides, run_dir, log) with `train_vectorised` and fills in
    their returncode, wall_s, metrics and error as the process sweep does; each run's log says how it ran.
    `cache_dir`: JAX's persistent compilation cache for this process (when none is set yet), so the runs'
    earlier stages, run one after another, compile once."""
    import traceback

    from jaxrl_llm.train.config import load_experiment
    from jaxrl_llm.train.sweep import final_metrics

    cfgs = [load_experiment(spec, r.overrides) for r in runs]
    check_members(cfgs)
    if cache_dir and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    for r in runs:
        r.log.write_text(f"vectorised: {spec} {' '.join(f'--set {o}' for o in r.overrides)}, one of {len(runs)} "
                         "runs in one program per iteration of the last stage\n")
    t0 = time.time()
    try:
        train_vectorised(cfgs, fresh=fresh, say=say)
        error, code = "", 0
    except ConfigError:
        raise
    except Exception:
        error, code = traceback.format_exc(), 1
    wall = round(time.time() - t0, 1)
    for r in runs:
        r.returncode, r.wall_s, r.error = code, wall, error[-4000:]
        if error:
            with open(r.log, "a") as f:
                f.write(error)
        r.metrics = final_metrics(r.run_dir) if r.ok else {}
        say(f"{r.variant} seed {r.seed}: {'ok' if r.ok else 'FAILED (see ' + str(r.log) + ')'} ({wall:.0f} s, "
            "all runs together)")
