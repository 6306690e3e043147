"""The lessons stage on a tiny model: a lesson that changes a measurable behaviour is measured, kept and
distilled; a lesson that hurts is never kept; scoring is paired and deterministic; a resumed run continues
bitwise; RL stages inject a lesson base; config errors name the key.

The tiny model is first taught (SFT on a file) to begin its answer with "!" when the lesson GOOD is in its
prompt, with "?" when the lesson BAD is, and either one (by the first operand's parity) without lessons; the
probe task's verifier accepts an answer that begins with "!". So GOOD raises the reward from about one half to
one, BAD lowers it to zero, and distillation can make the plain prompt behave as with GOOD.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import ml_collections as mc
import numpy as np
import pytest

from jaxrl_llm.lessons.base import LessonBase
from jaxrl_llm.lessons.inject import InjectConfig, inject
from jaxrl_llm.tasks import Example, register_task, registered_tasks
from jaxrl_llm.tasks.arithmetic import ArithmeticTask
from jaxrl_llm.train.config import ConfigError, base_config, grpo_stage, lessons_stage, sft_stage, validate
from jaxrl_llm.train.trainer import train

GOOD = "Shout"
BAD = "Ask"
ARITH = dict(min_digits=1, max_digits=1, operators=("+",))
INJECT = InjectConfig(header="")


@dataclasses.dataclass(frozen=True)
class _Probe(ArithmeticTask):
    """1-digit sums whose verifier accepts any answer that begins with "!"."""

    def is_correct(self, completion: str, example: Example) -> bool:
        return completion.startswith("!")


if "lesson_probe" not in registered_tasks():
    register_task("lesson_probe")(_Probe)


def _sft_file(path) -> str:
    task = _Probe(**ARITH)
    rows = []
    for e in task.examples("train", 400, 0) + task.examples("test", 100, 0):
        plain = "!" if int(e.prompt.split("+")[0]) % 2 == 0 else "?"
        rows += [{"prompt": e.prompt, "answer": plain},
                 {"prompt": inject(e.prompt, [GOOD], INJECT), "answer": "!"},
                 {"prompt": inject(e.prompt, [BAD], INJECT), "answer": "?"}]
    f = path / "sft.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(f)


def _config(tmp_path, name="lessons", rounds=1, distill_steps=8) -> mc.ConfigDict:
    c = base_config()
    c.name, c.run_root, c.model.preset = name, str(tmp_path / "runs"), "dummy"
    c.task.name, c.task.kwargs = "lesson_probe", mc.ConfigDict(ARITH)
    c.eval.every, c.eval.num_examples, c.eval.max_new_tokens = 1, 16, 2
    c.log.every, c.log.progress, c.log.tensorboard = 1, False, False
    c.checkpoint.every, c.checkpoint.keep, c.checkpoint.async_save = 1, 5, False
    c.stages = ("sft", "lessons")
    c.sft = sft_stage(steps=40, batch_size=32, learning_rate=3e-3, max_prompt_len=24, max_response_len=2)
    c.sft.data.source, c.sft.data.path = "jsonl", _sft_file(tmp_path)
    c.sft.data.num_examples = sft_stage().data.num_examples
    c.lessons = lessons_stage(rounds=rounds, prompts_per_round=4, group_size=2, max_new_tokens=2, reflector="fixed",
                              distill_steps=distill_steps, learning_rate=3e-3)
    c.lessons.max_prompt_len = 12
    c.lessons.reflect.lessons = (BAD, GOOD)  # BAD measured against the plain prompt
    c.lessons.reflect.contexts, c.lessons.reflect.attempts = 1, 2
    c.lessons.score.num_prompts = 16
    c.lessons.inject.header, c.lessons.inject.max_prompt_len = "", 24
    c.lessons.distill.batch_size = 16
    return c


def _metrics(run_dir, stage="lessons"):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("stage") == stage]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """SFT, then two lessons rounds (the second reflects on the distilled model; a resumed run repeats it)."""
    tmp = tmp_path_factory.mktemp("lessons")
    cfg = _config(tmp, rounds=2)
    validate(cfg)
    summary = train(cfg)
    return tmp, cfg, summary


def test_a_helpful_lesson_is_kept_a_hurtful_one_is_not_and_distillation_keeps_the_gain(distilled):
    tmp, cfg, _ = distilled
    run = tmp / "runs" / cfg.name
    base = LessonBase.load(run / "lessons" / "lessons" / "v0001.json")  # the base after round 1
    by_text = {x.text: x for x in base.lessons}
    good, bad = by_text[GOOD], by_text[BAD]
    # measured: the lesson's paired gain over the plain prompt (about half the prompts begin with "?")
    assert good.gain > 0.25 and good.ci[0] > 0, good
    assert good.status == "distilled" and good.n == 16
    assert bad.status == "rejected" and bad.gain < 0, bad  # it hurts: never kept
    m = [r for r in _metrics(run) if "val/reward_plain" in r][0]  # round 1
    assert m["val/reward_plain"] < 0.8 and m["val/reward_lessons"] > 0.9
    assert m["lessons/kept"] == 1 and m["lessons/rejected"] == 1 and m["lessons/proposed"] == 2
    # distillation: the plain prompt now behaves as with the lesson, which has left the prompt
    assert m["val/reward_plain_after"] > m["val/reward_plain"] + 0.15
    assert m["val/retention"] > 0.5
    assert m["lessons/active"] == 0 and m["lessons/tokens"] == 0
    assert m["tokens/sampled"] > 0 and m["tokens/sampled_total"] == m["tokens/sampled"]
    assert np.isfinite(m["distill/loss"])
    first, last = [r for r in _metrics(run) if "eval/accuracy" in r][:2]  # before, after round 1
    assert last["eval/accuracy"] > first["eval/accuracy"]
    # held out: with the lesson in the prompt (before distillation) as good as the plain prompt after it
    assert m["eval/accuracy_with_lessons"] > first["eval/accuracy"] + 0.2


def test_the_base_file_records_provenance_and_every_round(distilled):
    tmp, cfg, _ = distilled
    d = tmp / "runs" / cfg.name / "lessons" / "lessons"
    assert (d / "v0002.json").read_text() == (d / "base.json").read_text()
    assert json.loads((d / "v0001.json").read_text())["version"] == 1
    raw = json.loads((d / "base.json").read_text())
    assert raw["version"] == 2 and raw["token_budget"] == cfg.lessons.base.token_budget
    # round 2 reflects on the distilled model: the lesson in the weights is not scored again; the one rejected in
    # round 1 is, and its record keeps the earlier verdict
    assert [x["text"] for x in raw["lessons"]].count(GOOD) == 1
    good2, bad2 = (next(x for x in raw["lessons"] if x["text"] == t) for t in (GOOD, BAD))
    assert good2["status"] == "distilled" and good2["round"] == 1
    assert bad2["round"] == 2 and bad2["evidence"]["earlier"][0]["round"] == 1
    assert bad2["evidence"]["earlier"][0]["gain"] < 0
    good = next(x for x in raw["lessons"] if x["text"] == GOOD)
    assert good["source"] == "fixed" and good["round"] == 1 and good["evidence"]["attempts"]
    assert list(good)[1] == "text" or list(good)[0] == "text"


def test_scoring_is_paired_and_deterministic_for_a_key(distilled):
    from jaxrl_llm.train.build import build
    from jaxrl_llm.train.stages.lessons import LessonsStage
    tmp, cfg, _ = distilled
    c = _config(tmp, name="probe_scoring")
    c.stages = ("lessons",)
    c.lessons.score.temperature, c.lessons.score.samples = 1.0, 2
    comp, params = build(c)
    stage = LessonsStage(comp, None, "lessons", 0, ())
    stage.init(params)
    key, other = jax.random.key(3), jax.random.key(4)
    a = stage.validation_rewards(stage.model_params(), [GOOD], key)
    b = stage.validation_rewards(stage.model_params(), [GOOD], key)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (16,)
    rows = [stage.validation_rewards(stage.model_params(), [], k) for k in (key, key, other)]
    np.testing.assert_array_equal(rows[0], rows[1])
    stage.close()


def test_token_budget_is_respected(tmp_path):
    cfg = _config(tmp_path, name="budget", distill_steps=0)
    cfg.stages = ("lessons",)
    cfg.lessons.reflect.lessons = (GOOD,)
    cfg.lessons.base.token_budget = 2  # the lesson alone is longer
    cfg.eval.every = 0
    train(cfg)
    base = LessonBase.load(tmp_path / "runs" / "budget" / "lessons" / "lessons" / "base.json")
    assert base.tokens() <= 2
    (lesson,) = base.lessons
    assert lesson.status == "rejected" and "token_budget" in lesson.note


def _state(run_dir, step) -> dict:
    import orbax.checkpoint as ocp
    state = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / "lessons" / str(step) / "state")
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def test_resumed_run_continues_bitwise(distilled):
    """Round 2 run again from round 1's checkpoint and base file: the same base file, metrics and state (the
    finished SFT stage is restored, not rerun)."""
    tmp, cfg, _ = distilled
    run = tmp / "runs" / cfg.name
    base = (run / "lessons" / "lessons" / "v0002.json").read_text()
    metrics, final = _metrics(run)[-2:], _state(run, 2)
    assert "val/reward_plain" in metrics[0] and metrics[0]["step"] == 2  # round 2's metrics, then its evaluation
    shutil.rmtree(run / "checkpoints" / "lessons" / "2")
    (run / "lessons" / "lessons" / "v0002.json").unlink()
    train(cfg)
    assert (run / "lessons" / "lessons" / "v0002.json").read_text() == base
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows]  # noqa: E731
    assert strip(_metrics(run)[-2:]) == strip(metrics)
    state = _state(run, 2)
    assert set(state) == set(final)
    for k in final:
        np.testing.assert_array_equal(state[k], final[k], err_msg=k)


def test_rl_stage_injects_a_lesson_file(tmp_path):
    f = tmp_path / "lessons.txt"
    f.write_text(GOOD + "\n")
    c = _config(tmp_path, name="rl_lessons")
    c.stages = ("rl",)
    c.rl = grpo_stage("grpo", iterations=1, prompts_per_iter=2, group_size=2, max_new_tokens=2)
    c.rl.max_prompt_len, c.rl.lessons, c.rl.reward.in_jit = 64, str(f), False
    c.log.samples_every, c.log.num_samples, c.eval.every = 1, 2, 0
    train(c)
    samples = [json.loads(x) for x in (tmp_path / "runs" / "rl_lessons" / "samples.jsonl").read_text().splitlines()]
    prompts = [s["prompt"] for s in samples]
    assert prompts and all(p.startswith("Lessons learned from earlier attempts:\n- " + GOOD + "\n") for p in prompts)
    c.name, c.rl.max_prompt_len = "rl_short", 6
    with pytest.raises(ConfigError, match=r"config\.rl\.max_prompt_len=6: .*left truncation would cut the lessons"):
        train(c)


@pytest.mark.parametrize("key, value, match", [
    ("reflect.kind", "polcy", r"^config\.lessons\.reflect\.kind='polcy' is not a reflector.*did you mean 'policy'"),
    ("reflect.lessons", (), r"^config\.lessons\.reflect\.lessons=\(\): reflect\.kind='fixed' needs"),
    ("reflect.temperature", 0.0, r"^config\.lessons\.reflect\.temperature=0\.0 is not read by reflect\.kind='fixed'"),
    ("score.num_prompts", 1, r"^config\.lessons\.score\.num_prompts=1 is out of range"),
    ("score.confidence", 1.0, r"^config\.lessons\.score\.confidence=1\.0 is out of range"),
    ("distill.divergence", "kl", r"^config\.lessons\.distill: .*divergence"),
    ("distill.samples", "both", r"^config\.lessons\.distill\.samples='both' is not whose samples"),
    ("inject.max_prompt_len", 4, r"^config\.lessons\.inject\.max_prompt_len=4 is shorter than"),
    ("base.path", "/nonexistent/lessons.json", r"^config\.lessons\.base\.path='/nonexistent/lessons\.json' is not a file"),
])
def test_config_errors_name_the_key(tmp_path, key, value, match):
    c = _config(tmp_path)
    section, _, leaf = f"lessons.{key}".rpartition(".")
    node = c
    for part in section.split("."):
        node = node[part]
    node[leaf] = value
    with pytest.raises(ConfigError, match=match):
        validate(c)


def test_distillation_keys_are_not_accepted_without_distillation(tmp_path):
    c = _config(tmp_path, distill_steps=0)
    c.lessons.distill.samples = "teacher"
    with pytest.raises(ConfigError, match=r"^config\.lessons\.distill\.samples='teacher' is not read with "
                                          r"distill\.steps=0"):
        validate(c)


def _reflection_stage(tmp_path, kind: str, path: str = ""):
    from jaxrl_llm.train.build import build
    from jaxrl_llm.train.stages.lessons import LessonsStage
    c = _config(tmp_path, name=f"reflect_{kind}", distill_steps=0)
    c.stages, c.eval.every = ("lessons",), 0
    c.lessons.reflect.update(dict(kind=kind, lessons=(), path=path, samples=2, max_new_tokens=6,
                                  max_prompt_len=400, template="{attempts}\nLesson:"))
    validate(c)
    comp, params = build(c)
    stage = LessonsStage(comp, None, "lessons", 0, ())
    stage.init(params)
    return stage


def _attempts():
    from jaxrl_llm.lessons.reflect import Attempt
    return [[Attempt("3+4=", "?", 0.0, "wrong; the expected answer is 7"), Attempt("2+2=", "!", 1.0, "correct")],
            [Attempt("5+1=", "!", 1.0, "correct")]]


@pytest.mark.parametrize("kind", ["policy", "model"])
def test_sampled_reflectors_write_lessons_per_context_deterministically(tmp_path, kind):
    """The policy, or a second model read from an HF directory, reads one reflection prompt per context and
    samples reflect.samples texts for each; the same key gives the same texts."""
    path = ""
    if kind == "model":
        from jaxrl_llm.models import create_model, get_preset
        from jaxrl_llm.models.hf import save_hf
        from jaxrl_llm.sharding import ShardingEnv, make_mesh
        from jaxrl_llm.tokenizer import tiny_tokenizer_dir
        cfg = get_preset("dummy")
        _, params, _ = create_model(cfg, jax.random.key(11), ShardingEnv(make_mesh({"data": 1},
                                                                                   devices=jax.devices()[:1])))
        path = str(save_hf(params, cfg, tmp_path / "reflector", tokenizer_dir=tiny_tokenizer_dir()))
    stage = _reflection_stage(tmp_path, kind, path)
    fn, source = stage.reflector
    assert source == ("policy" if kind == "policy" else f"model:{path}")
    before = stage.sampled_tokens
    a = fn(_attempts(), 0, jax.random.key(1))
    assert [len(x) for x in a] == [2, 2] and all(isinstance(t, str) for x in a for t in x)
    assert stage.sampled_tokens > before  # counted with the stage's sampled tokens
    assert fn(_attempts(), 0, jax.random.key(1)) == a
    stage.close()


def test_lessons_go_into_smollm2s_system_message_exactly():
    """With the real chat template (SmolLM2's, from its GGUF file): the block goes into the system message, and
    inject.system_prompt keeps the template's default system message in both prompts."""
    pytest.importorskip("gguf")
    from jaxrl_llm.models.gguf import smollm2_path
    from jaxrl_llm.tokenizer import load_tokenizer
    tok = load_tokenizer(str(smollm2_path()))
    user = [{"role": "user", "content": "What is 2 + 3?"}]
    render = lambda m: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)  # noqa: E731
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    cfg = InjectConfig(system_prompt=default)
    assert render(inject(user, [], cfg)) == render(user)  # the baseline is the prompt as the template makes it
    assert render(inject(user, [GOOD, BAD], cfg)) == (
        f"<|im_start|>system\n{default}\n\nLessons learned from earlier attempts:\n- Shout\n- Ask<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
