"""Rollout overlapped with training: the rollout of iteration i uses the policy of k updates before.

An RL section's `overlap` subsection (`overlap_section`, in every grpo and ppo section):

    staleness        k >= 0: iteration i samples with theta_{max(0, i - k)} (theta_j: the policy after j updates).
                     0 = the on-policy loop (rollout, rewards, update), unchanged: no pipeline is built.
    rollout_devices  0: rollout and training share the devices; the rollout of a later iteration runs in a
                     background thread with its own copy of the parameters while the update is dispatched.
                     r > 0: the last r devices form the rollout mesh, the others the training mesh (the
                     whole run's: `build` lays the training mesh over the first devices); the parameters are
                     transferred to the rollout mesh every iteration (`time/weight_transfer_s`).

With k > 0 a batch was sampled by an older policy (the behaviour policy mu = pi_{theta_{i-k}}); the update
weights each token's policy-gradient term by the truncated importance weight
min(pi_old / mu, tis_cap), pi_old being the policy the update starts from (the proximal policy of decoupled
PPO), i.e. the existing `algo.loss.tis_cap` with the sampler's log-probs. k > 0 turns it on with
DEFAULT_TIS_CAP when the section leaves it unset (`with_off_policy_correction`); docs/async.md has the
formulas and the reasons.

`RolloutPipeline` owns the queue of pending rollouts and the stale parameter copies. It calls the stage's
own `experience(i, params, ...)` in a one-worker thread, in iteration order (the prompt iterator is read
there), with the same keys as the on-policy loop: a run is a function of its config and seed whatever the
threads' timing. A checkpoint after iteration n holds the k parameter copies the pending rollouts
n .. n+k-1 sample with and the prompt position before rollout n: a resumed run samples them again,
identically.
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import dataclasses
import threading
import time
from typing import Callable

import jax
import ml_collections as mc
from jax.sharding import NamedSharding, PartitionSpec

from jaxrl_llm.train.build import jnp_tree_copy
from jaxrl_llm.train.config import ConfigError, nearest
from jaxrl_llm.train.validation import integer

KEYS = ("staleness", "rollout_devices")
DEFAULT_TIS_CAP = 2.0  # verl's truncated-importance-sampling cap
_SCORER_STATE = ("last_calls", "last_failed", "last_failure")  # what RewardWatch reads after each rollout


def overlap_section() -> mc.ConfigDict:
    """The `overlap` section of an RL stage (see the module docstring)."""
    return mc.ConfigDict(dict(staleness=0, rollout_devices=0))


def settings(s: mc.ConfigDict) -> tuple[int, int]:
    """(staleness, rollout_devices) of an RL section; (0, 0) for a section without `overlap`."""
    o = s.get("overlap")
    if o is None:
        return 0, 0
    return int(o.get("staleness", 0)), int(o.get("rollout_devices", 0))


def check_overlap(cfg: mc.ConfigDict, name: str) -> None:
    """The keys of `config.<name>.overlap`, and that every stage that splits the devices splits them alike."""
    o = cfg[name].get("overlap")
    if o is None:
        return
    where = f"config.{name}.overlap"
    for key in o.keys():
        if key not in KEYS:
            raise ConfigError(f"{where}.{key} is not a key of the overlap section{nearest(key, KEYS)} "
                              f"(keys: {', '.join(KEYS)})")
    k = integer(o.staleness, f"{where}.staleness", 0,
                means="updates between the policy that samples a batch and the one it trains; 0 = on-policy",
                example=1)
    r = integer(o.rollout_devices, f"{where}.rollout_devices", 0,
                means="devices of the rollout mesh; 0 = rollout and training share the devices", example=1)
    if r > 0 and k == 0:
        raise ConfigError(f"{where}.rollout_devices={r} with {where}.staleness=0: on-policy, each rollout waits "
                          "for the update before it and each update for its rollout, so the two device sets would "
                          f"take turns idling; set --set {name}.overlap.staleness=1 (one-step off-policy) or "
                          f"{name}.overlap.rollout_devices=0")
    run_rollout_devices(cfg)


def run_rollout_devices(cfg: mc.ConfigDict) -> int:
    """The run's rollout device count: the `overlap.rollout_devices` of its RL stages that set one (> 0),
    which must agree (the training mesh is the whole run's), or 0."""
    given = {n: int(cfg[n].overlap.rollout_devices) for n in cfg.stages
             if n in cfg and isinstance(cfg[n], mc.ConfigDict) and cfg[n].get("overlap") is not None
             and int(cfg[n].overlap.get("rollout_devices", 0)) > 0}
    if len(set(given.values())) > 1:
        listing = ", ".join(f"{n}.overlap.rollout_devices={v}" for n, v in given.items())
        raise ConfigError(f"{listing}: the stages of a run share one training mesh, so every stage that "
                          "disaggregates must give the same rollout device count; make them equal")
    return next(iter(given.values()), 0)


def split_devices(cfg: mc.ConfigDict, devices: list) -> tuple[list, list]:
    """(training devices, rollout devices): the last `rollout_devices` of `devices` roll out."""
    r = run_rollout_devices(cfg)
    if r == 0:
        return list(devices), []
    name = next(n for n in cfg.stages if cfg[n].get("overlap") is not None
                and int(cfg[n].overlap.get("rollout_devices", 0)) == r)
    key = f"config.{name}.overlap.rollout_devices"
    if jax.process_count() > 1:
        raise ConfigError(f"{key}={r} in a run of {jax.process_count()} processes: disaggregated rollout runs in "
                          f"one process only; set --set {name}.overlap.rollout_devices=0 (the rollout then "
                          "overlaps the update on the same devices)")
    if r >= len(devices):
        raise ConfigError(f"{key}={r} leaves no training device: this process has {len(devices)} device(s); "
                          f"set it to at most {len(devices) - 1} (e.g. --cpu-devices {r + 1} on a CPU), or 0")
    return list(devices[:-r]), list(devices[-r:])


def rollout_env(cfg: mc.ConfigDict, devices: list, mesh_env: Callable):
    """The rollout mesh's ShardingEnv over `devices`: the run's mesh axes (mesh.axes) laid over them, with
    the run's sharding rules."""
    from jaxrl_llm.errors import MeshError
    from jaxrl_llm.sharding import make_mesh, resolve_axis_sizes
    from jaxrl_llm.sharding.presets import mesh_axes_for
    try:
        axes = resolve_axis_sizes(mesh_axes_for(cfg.mesh, len(devices)), len(devices))
    except MeshError as e:
        raise ConfigError(f"the rollout mesh over the {len(devices)} rollout device(s) (overlap.rollout_devices) "
                          f"cannot use the run's mesh: {e}. Give mesh.axes with one -1 axis (e.g. data: -1), so "
                          "both meshes can be laid out") from None
    return mesh_env(cfg, make_mesh(axes, devices))


def with_off_policy_correction(loss, s: mc.ConfigDict):
    """`loss` (a PolicyLossConfig) with tis_cap = DEFAULT_TIS_CAP when the section's overlap.staleness > 0
    and tis_cap is unset: a stale batch is weighted by the truncated importance ratio pi_old / pi_sampler
    (an explicit value wins)."""
    if settings(s)[0] > 0 and loss.tis_cap is None:
        return dataclasses.replace(loss, tis_cap=DEFAULT_TIS_CAP)
    return loss


def memory_terms(s: mc.ConfigDict, z) -> dict[str, int]:
    """Per-device bytes the pipeline adds on the training devices: k stale policy copies when they share
    the devices with training (on the rollout devices otherwise)."""
    k, r = settings(s)
    return {"stale_policies": k * z.params("policy")} if k > 0 and r == 0 else {}


def _spec(x) -> PartitionSpec:
    sh = getattr(x, "sharding", None)
    return sh.spec if isinstance(sh, NamedSharding) else PartitionSpec()


def _move(tree, mesh):
    """`tree` on `mesh`, each array with its own partition spec (the meshes share their axis names)."""
    return jax.device_put(tree, jax.tree.map(lambda x: NamedSharding(mesh, _spec(x)), tree))


class RoutedSampler:
    """A sampler on the rollout mesh behind the stage's sampler interface: the prompts and key go to the
    rollout devices, the Rollout comes back to the training mesh (so rewards and the batch are where the
    update runs); the parameters are already there (`RolloutPipeline` transfers them)."""

    def __init__(self, sampler, env, train_env):
        self.sampler, self.env, self.train_env = sampler, env, train_env

    def __call__(self, params, prompt_tokens, prompt_mask, rng):
        prompt = self.env.sharding(("batch", "length"), prompt_tokens.shape)
        ro = self.sampler(params, jax.device_put(prompt_tokens, prompt), jax.device_put(prompt_mask, prompt),
                          jax.device_put(rng, NamedSharding(self.env.mesh, PartitionSpec())))
        return _move(ro, self.train_env.mesh)


@dataclasses.dataclass
class _Pending:
    i: int
    future: concurrent.futures.Future
    started: threading.Event


class RolloutPipeline:
    """The pending rollouts of an RL stage with overlap.staleness = k > 0 (see the module docstring).

    stage.init -> init(theta_0); each step i: experience(i, theta_i, ...) before the update (it submits the
    rollout of i + k with a copy of theta_i, then returns iteration i's Experience); tree() / meta() /
    restore() go into and come from the stage's checkpoint; close() when the stage ends."""

    def __init__(self, stage, staleness: int, env=None):
        self.stage, self.k, self.env = stage, int(staleness), env
        self.total = int(stage.total_steps)
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.pending: collections.deque[_Pending] = collections.deque()
        self.snapshots: dict[int, dict] = {}  # iterator state before rollout j
        self.start = 0   # the next iteration to hand out
        self.stale: list = []  # the parameters of rollouts start .. start + k - 1
        self.transfer_s = None

    @classmethod
    def for_stage(cls, stage) -> "RolloutPipeline | None":
        """The stage's pipeline; None with staleness 0 (the on-policy loop)."""
        k, r = settings(stage.section)
        if k == 0:
            return None
        env = None
        if r > 0:
            if getattr(stage, "episodes", None) is not None:
                raise ConfigError(f"config.{stage.name}.overlap.rollout_devices={r} with a multi-turn environment "
                                  f"(config.{stage.name}.env): episodes run on the training mesh only; set --set "
                                  f"{stage.name}.overlap.rollout_devices=0 (the episodes then overlap the update on "
                                  "the same devices)")
            env = getattr(stage.comp, "rollout_env", None)
            if env is None:
                raise ConfigError(f"config.{stage.name}.overlap.rollout_devices={r}, but the run's components have "
                                  "no rollout mesh (they were built by something other than train.build.build); "
                                  "build them with it, or set rollout_devices=0")
        return cls(stage, k, env)

    # ------------------------------------------------------------------ state

    def init(self, params) -> None:
        """A fresh start from theta_0 = `params` (read, never donated): rollouts 0 .. k-1 sample with it."""
        self.close()
        if self.env is not None and not isinstance(self.stage.sampler, RoutedSampler):
            from jaxrl_llm.rollout import make_sampler
            shardings = jax.tree.map(lambda x: NamedSharding(self.env.mesh, _spec(x)), params)
            comp = self.stage.comp
            self.stage.sampler = RoutedSampler(
                make_sampler(comp.module, comp.model_cfg, self.stage.sampling, env=self.env,
                             param_shardings=shardings), self.env, comp.env)
        self.start = 0
        self.stale = [self._place(params)] * self.k

    def tree(self) -> dict:
        return {f"stale_{m}": p for m, p in enumerate(self.stale)}

    def meta(self) -> dict:
        return {"start": self.start}

    def restore(self, tree: dict, meta: dict) -> None:
        self.close()
        self.stale = [tree[f"stale_{m}"] for m in range(self.k)]
        self.start = int(meta["start"])

    def iterator_state(self) -> dict:
        """The prompt position before rollout `start` (what a checkpoint after iteration start-1 holds)."""
        if self.pending:
            p = self.pending[0]
            p.started.wait()
            if p.future.done() and p.future.exception() is not None and p.i not in self.snapshots:
                raise p.future.exception()
            return dict(self.snapshots[p.i])
        return self.stage.iterator.state()

    def close(self) -> None:
        """Ends the worker (pending rollouts are cancelled or waited for); the state stays for a checkpoint."""
        if self.pool is not None:
            for p in self.pending:
                p.future.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = None
        self.pending.clear()
        self.snapshots.clear()

    # ------------------------------------------------------------------ one iteration

    def experience(self, i: int, params, make_scorer: Callable | None = None, **kw):
        """Iteration i's Experience, sampled with theta_{max(0, i-k)}; `params` = theta_i, the policy the
        update of iteration i starts from (copied here: the update donates it). `make_scorer`: the stage's
        scorer from a copy of `stage.scorer` (None: that copy); `kw` go to `stage.experience`."""
        if i != self.start:
            raise RuntimeError(f"RolloutPipeline: iteration {i} asked for, {self.start} expected (iterations run in "
                               "order)")
        if not self.pending:  # a (re)start: the k rollouts whose parameters are held
            for m in range(self.k):
                if i + m < self.total:
                    self._submit(i + m, self.stale[m], make_scorer, kw)
        later = i + self.k < self.total
        new = self._place(params) if later else self.stale[-1]
        if later:
            self._submit(i + self.k, new, make_scorer, kw)
        p = self.pending.popleft()
        t0 = time.perf_counter()
        exp, scorer_state = p.future.result()
        wait_s = time.perf_counter() - t0
        for a, v in scorer_state.items():  # the watch reads the scorer of this iteration's rollout
            setattr(self.stage.scorer, a, v)
        self.snapshots.pop(p.i, None)
        self.stale = self.stale[1:] + [new]
        self.start = i + 1
        extra = {"overlap/staleness": float(self.k), "overlap/policy_lag": float(i - max(0, i - self.k)),
                 "time/rollout_wait_s": wait_s}
        if self.transfer_s is not None:
            extra["time/weight_transfer_s"] = self.transfer_s
        exp.metrics = {**exp.metrics, **extra}
        return exp

    def _place(self, params):
        """The pipeline's own copy of `params`: a copy on the same devices, or a transfer to the rollout
        mesh (timed from when the parameters are ready to when the copy is)."""
        if self.env is None:
            return jnp_tree_copy(params)
        jax.block_until_ready(params)
        t0 = time.perf_counter()
        out = jax.block_until_ready(_move(params, self.env.mesh))
        self.transfer_s = time.perf_counter() - t0
        return out

    def _submit(self, j: int, params, make_scorer, kw) -> None:
        if self.pool is None:
            self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"rollout-{self.stage.name}")
        started = threading.Event()
        self.pending.append(_Pending(j, self.pool.submit(self._job, j, params, make_scorer, kw, started), started))

    def _job(self, j: int, params, make_scorer, kw, started: threading.Event):
        stage = self.stage
        try:
            self.snapshots[j] = stage.iterator.state()
        finally:
            started.set()
        own = copy.copy(stage.scorer)  # its last_* are this rollout's, whatever the main thread reads meanwhile
        exp = stage.experience(j, params, scorer=make_scorer(own) if make_scorer else own, **kw)
        jax.block_until_ready((exp.batch, exp.rewards))  # done when the batch is: `time/rollout_wait_s` is real
        return exp, {a: getattr(own, a) for a in _SCORER_STATE if hasattr(own, a)}
