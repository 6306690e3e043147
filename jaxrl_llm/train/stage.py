"""The loop every stage shares: steps, logging, evaluation, checkpoints, resume, non-finite steps.

A kind of stage is registered once (`train.stages.STAGE_KINDS`, a `StageKind` each: its Stage subclass,
config helper, resolved algorithm config and memory terms). A stage subclass says how to start (`init`),
what one step does (`step`),
what goes into a checkpoint (`tree`, `meta`) and how to continue from one
(`restore`). `run()` does the rest:

* resume: the latest complete checkpoint of this stage is restored (state,
  data position, counters) and the logs are cut back to its step, so the
  run continues exactly as if it had never stopped;
* every `log.every` steps: metrics to metrics.jsonl / TensorBoard and the
  progress bar; every `eval.every`: held-out evaluation;
* every `checkpoint.every` steps and at the end: an orbax checkpoint (the
  final one is marked done, so a restarted run skips the finished stage);
* a step whose loss or gradient is not finite is skipped (parameters
  unchanged) and counted; after `max_consecutive_skips` in a row the run
  stops with a clear message and its last good checkpoint intact.

Randomness: step i of stage s uses fold_in(fold_in(key(seed), s), i).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections as mc

from jaxrl_llm.algos.train_state import TrainState
from jaxrl_llm.errors import DivergedError, ResumeError
from jaxrl_llm.sharding import multihost
from jaxrl_llm.train.build import Components, jnp_tree_copy, keys_for
from jaxrl_llm.train.checkpoint import CheckpointError
from jaxrl_llm.train.run_dir import RunDir


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _describe(topo: dict) -> str:
    mesh = " x ".join(f"{k}={v}" for k, v in topo.get("mesh", {}).items())
    return (f"{topo.get('process_count')} process(es) x {topo.get('local_device_count')} {topo.get('platform')} "
            f"device(s) (mesh {mesh or '?'})")


class NonFiniteError(DivergedError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclasses.dataclass(frozen=True)
class StageKind:
    """What the trainer and the run planner know about one kind of stage (registered in `train.stages`).

    kind: the `kind` of its config sections.
    stage: the Stage subclass that runs it.
    helper: the config helper that makes a section of this kind (e.g. `grpo_stage(...)`).
    memory: (cfg, section, sizes) -> {term: bytes per device} (`train.memory.Sizes`, `estimate_memory`).
    update_rows: section -> rows of one optimiser step (what micro-batches split).
    micro_batch_key: the section key (dotted) of the micro-batch count.
    logprob_chunk_key: the section key of the log-prob chunk (None: the kind has none).
    algo: (section, where) -> the algorithm config the stage runs, resolved and checked (the one source of
        what the stage computes, e.g. `needs_reference`); None for kinds without one.
    """

    kind: str
    stage: type
    helper: Callable[..., Any]
    memory: Callable[..., dict]
    update_rows: Callable[[Any], int]
    micro_batch_key: str
    logprob_chunk_key: str | None = None
    algo: Callable[[Any, str], Any] | None = None


class Stage:
    kind = "stage"

    def __init__(self, comp: Components, run: RunDir, name: str, index: int, stages_before: tuple[str, ...]):
        self.comp = comp
        self.cfg: mc.ConfigDict = comp.config
        self.section: mc.ConfigDict = comp.config[name]
        self.run = run
        self.name = name
        self.index = index
        self.stages_before = stages_before
        self.key = multihost.replicated(comp.env, keys_for(self.cfg.seed, index))  # the same on every process
        self.summary: dict[str, Any] = {}
        self.finished_before = False  # set by run_stage when the stage's final checkpoint was already there

    # --- to implement -------------------------------------------------------------------------
    total_steps: int
    # What the defaults of tree / meta / restore / params / evaluate read: a TrainState of the policy, a frozen
    # reference policy (kept in checkpoints as "ref_params"; None: the stage has none), the data iterator and
    # the held-out evaluator. A stage with other state overrides them.
    state: Any = None
    ref: Any = None
    iterator: Any = None
    evaluator: Any = None

    def init(self, params) -> None:
        """Fresh start from `params` (the previous stage's result or the initial model); also called
        before a resume, whose checkpoint then replaces the state."""
        raise NotImplementedError

    def step(self, i: int) -> dict:
        """One step; returns metrics (device arrays are fine: they are fetched only on log steps)."""
        raise NotImplementedError

    # --- LoRA (models/lora.py): the stage trains adapters on a frozen base when config.model.lora.rank > 0

    @property
    def lora(self):
        """The run's `LoraConfig`, or None (full fine-tuning)."""
        return self.comp.model_cfg.lora

    def make_state(self, params, optimizer, adapters=None) -> TrainState:
        """The stage's TrainState from the params it starts from. Full fine-tuning: a copy of `params` (the
        update donates it). LoRA: `adapters` (default: fresh ones of the policy module) are trained with the
        heads the base does not have, and the rest of `params` (adapters of a previous stage merged in) is
        the frozen base (`TrainState.frozen`, shared, not copied)."""
        if self.lora is None:
            return TrainState.create(jax.tree.map(jnp.copy, params), optimizer)
        from jaxrl_llm.models import lora
        if adapters is None:
            adapters = lora.init_adapters(self.comp.module, self.adapter_key(), self.comp.env)
        trainable, frozen = lora.prepare(params, adapters, self.lora)
        return TrainState.create(trainable, optimizer, frozen=frozen)

    def adapter_key(self, which: int = 0) -> jax.Array:
        """The key of the stage's fresh adapters (`which`: one model of several, e.g. PPO's value model)."""
        return jax.random.fold_in(jax.random.fold_in(self.key, 0x10A), which)

    def reference_copy(self, params, needed: bool):
        """The stage's frozen reference as it starts (`self.ref`): a copy of `params` when the algorithm
        `needed` one, else None; None under LoRA too, whose reference is the frozen base (`reference_params`)."""
        return jnp_tree_copy(params) if needed and self.lora is None else None

    def reference_params(self):
        """The frozen reference policy: the stage-start copy (`self.ref`), or under LoRA the frozen base
        the adapters sit on (adapters off: the policy the stage started from, no second copy)."""
        if self.lora is not None and self.state is not None and self.state.frozen is not None:
            return self.state.frozen
        return self.ref

    def model_params(self):
        """The policy as the model applies it (adapters unmerged under LoRA): what sampling and evaluation
        read."""
        return self.state.model_params()

    def tree(self) -> dict:
        """The pytrees a checkpoint holds: params, opt_state, step (and ref_params with a reference).
        Under LoRA "params" is the trained tree only (adapters and new heads): the frozen base is rebuilt
        from the run's model (model.path, or model.preset and seed) and the stages before."""
        tree = {"params": self.state.params, "opt_state": self.state.opt_state, "step": self.state.step}
        if self.ref is not None:
            tree["ref_params"] = self.ref
        return tree

    def meta(self) -> dict:
        """JSON-able state: the data position (and a stage's own counters)."""
        return {"iterator": self.iterator.state()} if self.iterator is not None else {}

    def restore(self, tree: dict, meta: dict) -> None:
        """Continues from a checkpoint's `tree` and `meta` (what `tree()` and `meta()` wrote)."""
        self.state = self.state.replace(params=tree["params"], opt_state=tree["opt_state"], step=tree["step"])
        if "ref_params" in tree:
            self.ref = tree["ref_params"]
        if self.iterator is not None:
            self.iterator.restore(meta["iterator"])

    def evaluate(self) -> dict:
        return self.evaluator(self.model_params()) if self.evaluator is not None else {}

    def params(self):
        """The policy the stage has trained so far (what the next stage starts from). Under LoRA its
        adapters merged into the kernels (W + alpha/rank A B computed in float32, stored in the base's dtype):
        the next stage starts from, and takes as its reference, exactly this policy, and shares its arrays as
        its frozen base."""
        if self.lora is None:
            return self.state.params
        from jaxrl_llm.models import lora
        return lora.merge_adapters(self.model_params(), self.lora.scale)

    def close(self) -> None:
        """Releases what the stage holds beyond device memory (reward worker pools)."""

    # --- the shared loop ------------------------------------------------------------------------

    def run_stage(self, prev_params, checkpointer) -> Any:
        """Runs (or resumes, or skips when finished) the stage; returns its final params."""
        start = 0
        self.init(prev_params)  # a fresh state also gives the shapes/shardings a checkpoint restores into
        latest = checkpointer.latest_step()
        if latest is not None:
            tree, meta = self._restore_checkpoint(checkpointer, latest)
            self.summary = dict(meta.get("summary", {}))
            if meta.get("done"):
                self.finished_before = True
                return self.params()
            start = latest
            self.run.rewind(self.name, start, self.stages_before)
        else:
            self.run.rewind(self.name, 0, self.stages_before)
            if self.cfg.eval.every > 0:
                ev = self._log_eval(0)
                self.summary["accuracy_before"] = ev.get("eval/accuracy")
                if "eval/env/accuracy" in ev:  # episodes with the stage's environment (train.stages.episodes)
                    self.summary["env_accuracy_before"] = ev["eval/env/accuracy"]

        log_every, ck_every = self.cfg.log.every, self.cfg.checkpoint.every
        bar = self._progress(start)
        skips = 0
        t_last, steps_since = time.time(), 0
        for i in range(start, self.total_steps):
            metrics = self.step(i)
            steps_since += 1
            n = i + 1
            if "skipped" in metrics:
                skipped = float(metrics["skipped"]) > 0  # one scalar fetch: cheap next to a step
                skips = skips + 1 if skipped else 0
                if skips >= self.cfg.max_consecutive_skips:
                    checkpointer.wait()
                    raise NonFiniteError(
                        f"stage {self.name!r}: {skips} consecutive steps had a non-finite loss or gradient "
                        f"(last at step {n}); stopped. The last good checkpoint is in "
                        f"{self.run.checkpoint_dir(self.name)}. Lower the learning rate, check the data and "
                        "rewards, or raise max_consecutive_skips.")
            if n % log_every == 0 or n == self.total_steps:
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = time.time() - t_last
                host["time/step_s"] = dt / max(steps_since, 1)
                host["skipped_in_a_row"] = skips
                t_last, steps_since = time.time(), 0
                self.run.log_metrics(self.name, n, host)
                self._update_bar(bar, n, host)
            if self.cfg.eval.every > 0 and (n % self.cfg.eval.every == 0 or n == self.total_steps):
                ev = self._log_eval(n)
                if bar is not None and "eval/accuracy" in ev:
                    bar.write(f"{self.name} step {n}: held-out accuracy {ev['eval/accuracy']:.3f}")
            if n == self.total_steps:
                if "eval/accuracy" in self._last_eval:
                    self.summary["accuracy_after"] = self._last_eval["eval/accuracy"]
                if "eval/env/accuracy" in self._last_eval:
                    self.summary["env_accuracy_after"] = self._last_eval["eval/env/accuracy"]
                checkpointer.save(n, self.tree(), self._checkpoint_meta(done=True))
            elif ck_every > 0 and n % ck_every == 0:
                checkpointer.save(n, self.tree(), self._checkpoint_meta(done=False))
            if self.stop is not None and n < self.total_steps and self.stop.now(n):
                self._stop_at(n, checkpointer, saved=ck_every > 0 and n % ck_every == 0, bar=bar)
        checkpointer.wait()
        if bar is not None:
            bar.close()
        return self.params()

    _last_eval: dict = {}
    stop: Any = None  # train.signals.StopRequests of the run (set by the trainer); None: signals not handled

    def _stop_at(self, n: int, checkpointer, saved: bool, bar) -> None:
        """A stop signal: checkpoint step `n` (unless just saved), wait for it, and raise Interrupted."""
        if not saved:
            checkpointer.save(n, self.tree(), self._checkpoint_meta(done=False))
        checkpointer.wait()
        if bar is not None:
            bar.close()
        raise self.stop.error(
            f"at stage {self.name!r} step {n} of {self.total_steps}; checkpoint "
            f"{self.run.checkpoint_dir(self.name) / str(n)} saved. Run the same command again (without --fresh) to "
            "resume from it")

    def _checkpoint_meta(self, done: bool) -> dict:
        return {**self.meta(), "done": done, "summary": self.summary, "topology": self._topology()}

    def _topology(self) -> dict:
        return {**multihost.topology(), "mesh": {k: int(v) for k, v in self.comp.env.mesh.shape.items()}}

    def _restore_checkpoint(self, checkpointer, step: int) -> tuple[dict, dict]:
        """Restores checkpoint `step` into this stage. A checkpoint written on another topology (processes,
        devices, mesh) is resharded by orbax when it can be; when it cannot, the error says what changed."""
        saved = checkpointer.read_meta(step).get("topology")
        now = self._topology()
        where = f"{checkpointer.directory}/{step}"
        try:
            tree, meta = checkpointer.restore(step, _abstract(self.tree()))
            self.restore(tree, meta)
        except CheckpointError:
            raise  # another structure: the message lists what differs
        except Exception as e:
            if saved is None or saved == now:
                raise ResumeError(
                    f"stage {self.name!r}: checkpoint {where} cannot be read ({type(e).__name__}: {str(e)[:300]}); "
                    "its files were changed or removed after it was written. Delete that step directory to resume "
                    "from the checkpoint before it, or start the run anew (--fresh)") from e
            raise CheckpointError(
                f"stage {self.name!r}: checkpoint {where} was written on {_describe(saved)} and cannot be restored "
                f"on {_describe(now)} ({type(e).__name__}: {e}). Resume on the topology it was written on, or "
                "start the run anew (--fresh, or another --set name=...)") from e
        if saved is not None and saved != now and jax.process_index() == 0:
            print(f"note: stage {self.name!r} resumed checkpoint {where}, written on {_describe(saved)}, on "
                  f"{_describe(now)}", flush=True)
        return tree, meta

    def _log_eval(self, n: int) -> dict:
        ev = self.evaluate()
        if ev:
            self._last_eval = ev
            self.run.log_metrics(self.name, n, ev)
        return ev

    def _progress(self, start: int):
        if not self.cfg.log.progress or jax.process_index() != 0:
            return None
        from tqdm import tqdm
        return tqdm(total=self.total_steps, initial=start, desc=f"{self.name} ({self.kind})", dynamic_ncols=True,
                    leave=True)

    def _update_bar(self, bar, n: int, host: dict) -> None:
        if bar is None:
            return
        bar.update(n - bar.n)
        keys = ("reward/mean", "accuracy", "loss", "kl_ref", "response_length", "tokens_per_s")
        bar.set_postfix_str(" ".join(f"{k.split('/')[0]}={host[k]:.3g}" for k in keys if k in host))
