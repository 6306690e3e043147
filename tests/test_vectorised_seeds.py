"""Vectorised seeds (train/vectorised.py): members of one vmapped GRPO program equal separate `train` runs.

Members (seed 0, lr 1e-3) and (seed 1, lr 3e-3) of the demo's smoke preset (SFT then GRPO on the dummy model;
an entropy bonus and a KL term, so the policy moves although the dummy model earns no reward) run as one
vectorised program, seeds and learning rates both differing, and each as its own `train()`: per-step metrics,
held-out accuracy and the final parameters agree within float tolerance, while the members differ.
"""

import json

import jax
import numpy as np
import pytest

from jaxrl_llm.train.config import ConfigError, load_experiment

SPEC = "experiments/demo.py:smoke"
BASE = ("sft.steps=2", "rl.iterations=3", "rl.prompts_per_iter=2", "rl.algo.loss.entropy_coef=0.05",
        "rl.algo.loss.kl_coef=0.04", "eval.every=3", "eval.num_examples=8", "log.every=1", "checkpoint.every=0",
        "log.tensorboard=False", "log.progress=False", "log.samples_every=0")
MEMBERS = ((0, 1e-3), (1, 3e-3))


def _cfg(root, kind, seed, lr, extra=()):
    return load_experiment(SPEC, BASE + extra + (f"seed={seed}", f"rl.optimizer.learning_rate={lr}",
                                                 f"name='{kind}-s{seed}-lr{lr}'", f"run_root='{root}'"))


def _rl_records(run_dir):
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["stage"] == "rl":
            out.append(r)
    return out


def _params(run_dir, stage):
    """The policy in the stage's final checkpoint, float64 leaves."""
    import orbax.checkpoint as ocp

    from jaxrl_llm.train.checkpoint import STATE
    d = run_dir / "checkpoints" / stage
    step = max(int(p.name) for p in d.iterdir() if p.name.isdigit())
    tree = ocp.StandardCheckpointer().restore((d / str(step) / STATE).absolute())
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree["params"])]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from jaxrl_llm.train.trainer import train
    from jaxrl_llm.train.vectorised import train_vectorised
    root = tmp_path_factory.mktemp("vec")
    # the separate runs compile what the vectorised members' earlier stages compiled: the session's compilation
    # cache (conftest) gives it back
    vec = [_cfg(root, "vec", s, lr) for s, lr in MEMBERS]
    sep = [_cfg(root, "sep", s, lr) for s, lr in MEMBERS]
    summaries = train_vectorised(vec)
    for c in sep:
        train(c)
    return root, vec, sep, summaries


def test_members_equal_separate_runs(runs):
    root, vec, sep, summaries = runs
    assert [s["vectorised"] for s in summaries] == [1, 1]
    for cv, cs in zip(vec, sep):
        dv, ds = root / cv.name, root / cs.name
        rv, rs = _rl_records(dv), _rl_records(ds)
        assert [r["step"] for r in rv] == [r["step"] for r in rs] == [0, 1, 2, 3, 3]
        for a, b in zip(rv, rs):
            keys = set(b) - {"time", "time/step_s"}
            assert keys == set(a) - {"time", "time/step_s"}
            for k in keys - {"stage", "step"}:
                np.testing.assert_allclose(float(a[k]), float(b[k]), rtol=2e-4, atol=1e-6,  # "nan": a string
                                           err_msg=f"{cv.name} {a['step']} {k}")
        sv, ss = (json.loads((d / "summary.json").read_text()) for d in (dv, ds))
        for k in ("rl/accuracy_before", "rl/accuracy_after", "sft/accuracy_after"):
            assert sv[k] == ss[k]
        # Adam's m / sqrt(v) turns a rounding-level gradient difference on a weight whose gradient is near 0 into
        # a step of up to the learning rate: a few weights differ by ~1e-5 (the policy moves by > 1e-3, below)
        for a, b in zip(_params(dv, "rl"), _params(ds, "rl")):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5)


def test_members_differ_and_learn(runs):
    """The comparison above can fail: the policy moves in the RL stage, and differently per member."""
    root, vec, _, _ = runs
    moved = [max(np.max(np.abs(a - b)) for a, b in zip(_params(root / c.name, "rl"), _params(root / c.name, "sft")))
             for c in vec]
    assert 1e-3 < moved[0] < 2e-2 and moved[1] > 2 * moved[0]  # 3 Adam steps of lr 1e-3, and of lr 3e-3
    lr = [_rl_records(root / c.name)[1]["learning_rate"] for c in vec]
    np.testing.assert_allclose(lr, [1e-3, 3e-3], rtol=1e-6)
    kl = [_rl_records(root / c.name)[3]["kl_ref"] for c in vec]
    assert kl[0] > 1e-3 and kl[1] > 1.5 * kl[0]


def _free_form(cfg):
    with cfg.unlocked():
        cfg.task.kwargs = type(cfg.task.kwargs)(dict(answer_format="last_number"))  # scored on the host
    return cfg


def test_refusals(tmp_path):
    from jaxrl_llm.train.vectorised import check_members
    c = lambda *o: _cfg(tmp_path, "x", 0, 1e-3, o)  # noqa: E731
    cases = [
        ((c("rl.reward.in_jit=False"),), "a host-side reward cannot be vectorised"),
        ((_free_form(c()),), "task 'arithmetic' \\(with these task.kwargs\\) has no in-jit reward"),
        ((c("rl.overlap.staleness=1"),), "overlapped rollouts cannot be vectorised"),
        ((c("model.lora.rank=4"),), "LoRA cannot be vectorised"),
        ((c(), c("rl.algo.loss.clip_eps_high=0.28", "name='y'")), "config.rl.algo.loss.clip_eps_high differs"),
        ((c(), c()), "share the run name"),
    ]
    for cfgs, text in cases:
        with pytest.raises(ConfigError, match=text) as e:
            check_members(cfgs)
        assert "\n" not in str(e.value)


def test_sweep_refusals(tmp_path):
    from jaxrl_llm.train.sweep import sweep
    with pytest.raises(ConfigError, match=r"--grid rl.algo.loss.clip_eps_high=\.\.\.: only "
                                          r"rl.optimizer.learning_rate"):
        sweep(SPEC, {"rl.algo.loss.clip_eps_high": [0.2, 0.28]}, 1, run_root=tmp_path, vectorise=True, quiet=True)
    with pytest.raises(ConfigError, match="--jobs 2 with --vectorise"):
        sweep(SPEC, {}, 2, jobs=2, run_root=tmp_path, vectorise=True, quiet=True)
    with pytest.raises(ConfigError, match="config.sft.kind='sft': only a grpo stage can be vectorised"):
        sweep("experiments/sft.py:smoke", {}, 2, run_root=tmp_path, vectorise=True, quiet=True)
