"""Rollout overlapped with training (train/stages/overlap.py): staleness 0 is the on-policy loop, staleness k
samples iteration i with theta_{i-k}, resume is exact, the disaggregated meshes agree with the shared one."""

import hashlib
import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxrl_llm.errors import Interrupted
from jaxrl_llm.train import trainer
from jaxrl_llm.train.build import build
from jaxrl_llm.train.config import ConfigError, check, load_experiment
from jaxrl_llm.train.stages import STAGE_KINDS, grpo as grpo_stage_module, rl
from jaxrl_llm.train.trainer import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "experiments" / "demo.py") + ":smoke"
PPO = str(ROOT / "experiments" / "ppo.py") + ":smoke"
# The GRPO stage alone on the dummy model (4 prompts x 8 samples, 6 new tokens); its rewards are all 0, so an
# entropy bonus and a large step make every update move the policy (and the samples of the next rollouts).
BASE = ["stages=('rl',)", "rl.iterations=4", "rl.algo.loss.entropy_coef=0.05", "rl.optimizer.learning_rate=0.05",
        "eval.every=0", "log.every=1", "log.progress=False", "log.tensorboard=False", "log.samples_every=0",
        "checkpoint.keep=10"]


def _cfg(root, *sets, exp=DEMO, base=BASE):
    return load_experiment(exp, [*base, f"run_root={root}", *sets])


def _metrics(run_dir) -> list[dict]:
    rows = [json.loads(x) for x in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows]


def _checkpoint(run_dir, step=None) -> dict:
    ck = pathlib.Path(run_dir) / "checkpoints" / "rl"
    step = max(int(p.name) for p in ck.iterdir() if p.name.isdigit()) if step is None else step
    state = ocp.StandardCheckpointer().restore(ck / str(step) / "state")
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def _fingerprint(params) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()


def _same(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if tol:
            np.testing.assert_allclose(a[k], b[k], err_msg=k, **tol)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


class _Recorder:
    """Wraps rl.collect: what every rollout was sampled with (in call order = iteration order)."""

    def __init__(self):
        self.calls = []
        self.collect = rl.collect

    def __call__(self, sampler, params, prompts, key, scorer, n, **kw):
        exp = self.collect(sampler, params, prompts, key, scorer, n, **kw)
        self.calls.append(dict(fingerprint=_fingerprint(params), sampler=sampler, key=key, tokens=prompts.tokens,
                               mask=prompts.mask, completion=np.asarray(exp.rollout.tokens),
                               logprobs=np.asarray(exp.rollout.raw_logprobs),
                               devices={d.id for leaf in jax.tree.leaves(params) for d in leaf.sharding.device_set}))
        return exp


@pytest.fixture(scope="module")
def stale1(tmp_path_factory):
    """A staleness-1 run with a checkpoint after every iteration and every rollout recorded."""
    root = tmp_path_factory.mktemp("stale1")
    rec = _Recorder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rl, "collect", rec)
        out = train(_cfg(root, "rl.overlap.staleness=1", "checkpoint.every=1"))
    return out["run_dir"], rec.calls


def test_staleness_0_is_the_on_policy_loop(tmp_path):
    default = train(_cfg(tmp_path / "a", "rl.overlap.staleness=0", "rl.iterations=2"))["run_dir"]
    cfg = _cfg(tmp_path / "b", "rl.iterations=2")
    with cfg.unlocked():
        del cfg.rl["overlap"]  # a section written before the overlap keys existed
    without = train(cfg)["run_dir"]
    assert _metrics(default) == _metrics(without)
    assert not any(k.startswith("overlap/") for r in _metrics(default) for k in r)
    _same(_checkpoint(default), _checkpoint(without))


def test_staleness_1_samples_with_the_previous_policy(stale1):
    run_dir, calls = stale1
    assert len(calls) == 4  # one rollout per iteration, none beyond the last
    theta = {i: _fingerprint({k: v for k, v in _checkpoint(run_dir, i).items() if k.startswith("['params']")})
             for i in (1, 2, 3)}
    assert calls[0]["fingerprint"] == calls[1]["fingerprint"]  # iterations 0 and 1 both sample with theta_0
    for i in (1, 2, 3):  # the checkpoint after i updates holds theta_i
        assert theta[i] != calls[0]["fingerprint"]
    for i in (2, 3):
        assert calls[i]["fingerprint"] == theta[i - 1] != theta[i]
    # resampled by hand: theta_2 from its checkpoint, iteration 3's prompts and key give iteration 3's batch;
    # theta_3 gives other log-probs
    c = calls[3]
    for step, same in ((2, True), (3, False)):
        params = ocp.StandardCheckpointer().restore(pathlib.Path(run_dir) / "checkpoints" / "rl" / str(step)
                                                    / "state")["params"]
        ro = c["sampler"](jax.tree.map(np.asarray, params), c["tokens"], c["mask"], c["key"])
        if same:
            np.testing.assert_array_equal(np.asarray(ro.tokens), c["completion"])
            np.testing.assert_array_equal(np.asarray(ro.raw_logprobs), c["logprobs"])
        else:
            assert not np.array_equal(np.asarray(ro.raw_logprobs), c["logprobs"])
    rows = _metrics(run_dir)
    assert [r["overlap/policy_lag"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    assert all(r["overlap/staleness"] == 1.0 for r in rows)
    assert rows[0]["mismatch_kl"] < 1e-9 < rows[2]["mismatch_kl"]  # the behaviour policy is theta_{i-1}
    assert "tis_weight_mean" in rows[0]  # staleness > 0 turned the off-policy correction on


class _StopAfter:
    """StopRequests that asks for a stop after step `n` (as SIGTERM would)."""

    def __init__(self, n):
        self.n = n

    def __call__(self, every=1):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def now(self, step):
        return step == self.n

    def error(self, where):
        return Interrupted(f"stopped {where}")


def test_resume_with_staleness_1_is_exact(stale1, tmp_path, monkeypatch):
    run_dir, _ = stale1
    with monkeypatch.context() as mp:
        mp.setattr(trainer, "StopRequests", _StopAfter(2))
        with pytest.raises(Interrupted):  # a checkpoint after iteration 2 while rollout 2 is in flight
            train(_cfg(tmp_path, "rl.overlap.staleness=1", "checkpoint.every=3"))
    resumed = train(_cfg(tmp_path, "rl.overlap.staleness=1", "checkpoint.every=3"))["run_dir"]
    assert _metrics(resumed) == _metrics(run_dir)
    _same(_checkpoint(resumed), _checkpoint(run_dir))


def test_disaggregated_matches_the_shared_devices(stale1, tmp_path, monkeypatch):
    run_dir, shared_calls = stale1
    rec = _Recorder()
    seen = []
    step = grpo_stage_module.GRPOStage.step
    monkeypatch.setattr(rl, "collect", rec)
    monkeypatch.setattr(grpo_stage_module.GRPOStage, "step",
                        lambda self, i: (seen.append({d.id for x in jax.tree.leaves(self.state.params)
                                                      for d in x.sharding.device_set}), step(self, i))[1])
    split = train(_cfg(tmp_path, "rl.overlap.staleness=1", "rl.overlap.rollout_devices=4"))["run_dir"]
    assert all(s == {0, 1, 2, 3} for s in seen)  # the training state on the first 4 devices only
    assert all(c["devices"] == {4, 5, 6, 7} for c in rec.calls)  # the sampler's parameters on the last 4
    # the same keys and parameter versions; the training mesh has 4 devices instead of 8, so the gradient's
    # sum over devices runs in another order: equal up to float rounding
    rows, ref = _metrics(split), _metrics(run_dir)
    assert [r.keys() for r in rows] == [r.keys() for r in ref]
    for r, q in zip(rows, ref):
        for k in (k for k in r if k != "stage"):
            if isinstance(r[k], str):  # a non-finite value, written as a string ("nan": e.g. no right answer)
                assert r[k] == q[k], k
            else:
                np.testing.assert_allclose(r[k], q[k], rtol=2e-3, atol=1e-5, err_msg=k)
    np.testing.assert_array_equal(rec.calls[0]["completion"], shared_calls[0]["completion"])  # theta_0: the same
    # params of magnitude ~0.1 after 4 Adam steps of lr 0.05 (Adam's normalisation magnifies the rounding of
    # small gradients): within 2e-4
    params = lambda d: {k: v for k, v in _checkpoint(d).items() if k.startswith("['params']")}  # noqa: E731
    _same(params(split), params(run_dir), rtol=0, atol=2e-4)
    raw = [json.loads(x) for x in (pathlib.Path(split) / "metrics.jsonl").read_text().splitlines()]
    assert all(r["time/weight_transfer_s"] > 0 for r in raw[1:])


def test_ppo_with_staleness_1_runs_and_resumes(tmp_path, monkeypatch):
    base = ["stages=('rl',)", "rl.iterations=2", "eval.every=0", "log.every=1", "log.progress=False",
            "log.tensorboard=False", "log.samples_every=0", "rl.overlap.staleness=1", "checkpoint.every=0"]
    ref = train(_cfg(tmp_path / "ref", exp=PPO, base=base))["run_dir"]
    with monkeypatch.context() as mp:
        mp.setattr(trainer, "StopRequests", _StopAfter(1))
        with pytest.raises(Interrupted):
            train(_cfg(tmp_path / "cut", exp=PPO, base=base))
    cut = train(_cfg(tmp_path / "cut", exp=PPO, base=base))["run_dir"]
    assert _metrics(cut) == _metrics(ref)
    _same(_checkpoint(cut), _checkpoint(ref))
    assert [r["overlap/policy_lag"] for r in _metrics(ref)] == [0.0, 1.0]


def _error(*sets, exp=DEMO):
    with pytest.raises(ConfigError) as e:
        _cfg("/tmp/unused-overlap-test", *sets, exp=exp)
    return str(e.value)


def test_config_errors_and_the_correction():
    assert "rl.overlap.staleness=-1" in _error("rl.overlap.staleness=-1")
    assert "rl.overlap.rollout_devices=-2" in _error("rl.overlap.staleness=1", "rl.overlap.rollout_devices=-2")
    msg = _error("rl.overlap.rollout_devices=1")
    assert "rl.overlap.rollout_devices=1" in msg and "staleness=0" in msg and "staleness=1" in msg
    assert "rl.overlap.rollout_devices=1" in _error("rl.overlap.rollout_devices=1", exp=PPO)
    cfg = _cfg("/tmp/unused-overlap-test", "rl.overlap.staleness=1", "rl.overlap.rollout_devices=8")
    with pytest.raises(ConfigError, match=r"rollout_devices=8 leaves no training device"):
        build(cfg)
    cfg = _cfg("/tmp/unused-overlap-test")
    with cfg.unlocked():
        cfg.rl.overlap.stalness = 1
    with pytest.raises(ConfigError, match=r"config\.rl\.overlap\.stalness is not a key.*staleness"):
        check(cfg)
    # the off-policy correction: truncated importance sampling on with staleness > 0, an explicit cap kept
    for exp in (DEMO, PPO):
        algo = lambda *s: STAGE_KINDS["grpo" if exp == DEMO else "ppo"].algo(  # noqa: E731
            _cfg("/tmp/unused-overlap-test", *s, exp=exp).rl, "config.rl")
        assert algo().loss.tis_cap is None
        assert algo("rl.overlap.staleness=1").loss.tis_cap == 2.0
        assert algo("rl.overlap.staleness=1", "rl.algo.loss.tis_cap=1.5").loss.tis_cap == 1.5
