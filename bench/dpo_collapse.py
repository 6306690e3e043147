"""Why DPO collapses greedy accuracy on digit addition (experiments/dpo.py): trajectories, generations, token mass.

    # 1. a full run of plain DPO (experiments/dpo.py:plain, the file's default before nll_coef=1.0); its SFT
    #    checkpoint is the warm start of every variant below
    jaxrl-llm train experiments/dpo.py:plain --set run_root=/tmp/dpofix_runs --set name=base --set eval.every=25
    # 2. the pref stage alone from that SFT checkpoint (same seed, so the same SFT params as a full run), with
    #    overrides of experiments/dpo.py:plain; then the analysis of step 3 on its final params
    python bench/dpo_collapse.py train rpo --set pref.algo.nll_coef=1.0
    # 3. analysis of a finished run (the SFT params and the final pref params): greedy outputs sorted into
    #    correct / well-formed wrong / malformed, samples, and where the next-token mass goes along the gold
    python bench/dpo_collapse.py analyse base
    # 4. on-policy pairs: chosen = gold, rejected = one of the SFT policy's own wrong samples (temperature 1)
    python bench/dpo_collapse.py pairs /tmp/dpofix_runs/onpolicy.jsonl
    python bench/dpo_collapse.py train onpolicy --set pref.data.source=jsonl \\
        --set pref.data.path=/tmp/dpofix_runs/onpolicy.jsonl --set pref.data.eval_path=/tmp/dpofix_runs/heldout.jsonl
    # 5. the table: eval-step trajectories of every run named; a plot of them
    python bench/dpo_collapse.py report base rpo
    python bench/dpo_collapse.py plot docs/img/dpo_collapse.png base rpo

Runs go to /tmp/dpofix_runs/<name> (metrics.jsonl, analysis.json). Every variant reuses base's SFT checkpoint.
"""

import argparse
import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm.algos.logprobs import sequence
from jaxrl_llm.eval.evaluator import Evaluator
from jaxrl_llm.models.transformer import unembedding
from jaxrl_llm.train.build import build, make_evaluator
from jaxrl_llm.train.checkpoint import Checkpointer
from jaxrl_llm.train.config import load_experiment
from jaxrl_llm.train.pref_data import task_pairs
from jaxrl_llm.train.run_dir import RunDir
from jaxrl_llm.train.stages.preference import DPOStage
from jaxrl_llm.train.trainer import load_stage_policy

ROOT = pathlib.Path("/tmp/dpofix_runs")
SPEC = "experiments/dpo.py:plain"  # DPO without the NLL term (the default before the remedy)
WELL_FORMED = re.compile(r"^\d( \d)*$")


def config(name: str, overrides=()):
    return load_experiment(SPEC, [f"run_root={ROOT}", f"name={name}", "eval.every=25", "log.every=25",
                                  "log.progress=False",
                                  *overrides])


def stage_params(comp, cfg, name: str, stage: str, params):
    p, _, done = load_stage_policy(comp, cfg, ROOT / name, stage, params)
    if not done:
        sys.exit(f"{ROOT / name}: stage {stage!r} did not finish")
    return p


def generations(comp, ev, params):
    """Greedy completions of the held-out prompts: (texts, raw token rows, finished)."""
    ro = ev.sampler(params, ev.tokens, ev.mask, ev.key)
    toks, mask = np.asarray(ro.tokens), np.asarray(ro.mask)
    texts = [comp.tokenizer.decode([t for t, m in zip(r, mr) if m and t not in comp.eos_ids]) for r, mr in
             zip(toks, mask)]
    return texts[:len(ev.examples)], np.asarray(ro.finished)[:len(ev.examples)]


def classify(comp, ev, params) -> dict:
    texts, finished = generations(comp, ev, params)
    out = {"correct": 0, "wrong_well_formed": 0, "wrong_length": 0, "no_eos": 0, "non_digit": 0}
    for ex, t, f in zip(ev.examples, texts, finished):
        if comp.task.is_correct(t, ex):
            out["correct"] += 1
        elif not f:
            out["no_eos"] += 1
        elif not WELL_FORMED.match(t.strip()):
            out["non_digit"] += 1
        elif len(t.split()) != len(ex.answer.split()):
            out["wrong_length"] += 1
        else:
            out["wrong_well_formed"] += 1
    out = {k: v / len(texts) for k, v in out.items()}
    out["samples"] = [f"{ex.prompt} -> {t!r} (gold {ex.answer!r}{'' if f else ', no EOS'})"
                      for ex, t, f in list(zip(ev.examples, texts, finished))[:10]]
    return out


def token_mass(comp, stage, params) -> dict:
    """Teacher-forced along the held-out chosen (gold) responses: mean next-token probability of the gold
    token, other digits, the space, EOS and everything else, at digit / space / EOS positions; and at the
    first position where chosen and rejected differ, the chosen and the rejected token's probabilities."""
    a = {k: jnp.asarray(v) for k, v in stage.eval_arrays.items()}
    tok = comp.tokenizer
    digits = np.array([tok.encode(str(d))[0] for d in range(10)])
    space, eos = tok.encode(" ")[0], comp.eos_ids[0]
    batch = {"prompt_tokens": a["prompt_tokens"], "prompt_mask": a["prompt_mask"],
             "completion_tokens": a["chosen_tokens"], "completion_mask": a["chosen_mask"]}
    tokens, mask, p, n = sequence(batch)
    hidden, _ = comp.module.apply({"params": params}, tokens, None, mask, return_hidden=True)
    logits = hidden[:, p - 1:p - 1 + n].astype(jnp.float32) @ unembedding(params, comp.model_cfg).astype(jnp.float32)
    probs = np.asarray(jax.nn.softmax(logits, -1))  # [B, N, V]
    gold, m = np.asarray(a["chosen_tokens"]), np.asarray(a["chosen_mask"]).astype(bool)
    p_gold = np.take_along_axis(probs, gold[..., None], -1)[..., 0]
    p_digit, p_space, p_eos = probs[..., digits].sum(-1), probs[..., space], probs[..., eos]
    out = {}
    for kind, sel in (("digit", np.isin(gold, digits) & m), ("space", (gold == space) & m), ("eos", (gold == eos) & m)):
        g = p_gold[sel]
        other_digit = p_digit[sel] - np.where(np.isin(gold[sel], digits), g, 0)
        rest = 1 - p_digit[sel] - p_space[sel] - p_eos[sel]
        out[kind] = {"gold": float(g.mean()), "other_digit": float(other_digit.mean()),
                     "space": float(p_space[sel].mean()), "eos": float(p_eos[sel].mean()), "other": float(rest.mean())}
    rej = np.asarray(a["rejected_tokens"])
    n_common = min(gold.shape[1], rej.shape[1])
    diff = gold[:, :n_common] != rej[:, :n_common]
    first = diff.argmax(1)
    rows = np.flatnonzero(diff.any(1))
    pr = probs[rows, first[rows]]
    out["first_difference"] = {"chosen": float(pr[np.arange(len(rows)), gold[rows, first[rows]]].mean()),
                               "rejected": float(pr[np.arange(len(rows)), rej[rows, first[rows]]].mean()),
                               "position_mean": float(first[rows].mean())}
    return out


def analyse(name: str, overrides=(), comp=None, params=None, final=None) -> dict:
    cfg = config(name, overrides)
    if comp is None:
        comp, params = build(cfg)
    sft = stage_params(comp, cfg, "base", "sft", params)
    final = stage_params(comp, cfg, name, "pref", params) if final is None else final
    ev = make_evaluator(comp, cfg.pref.max_prompt_len)
    stage = DPOStage(comp, None, "pref", 1, ("sft",))
    res = {}
    for label, p in (("sft", sft), ("final", final)):
        res[label] = {"greedy": classify(comp, ev, p), "token_mass": token_mass(comp, stage, p)}
    (ROOT / name / "analysis.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return res


def train(name: str, overrides) -> None:
    cfg = config(name, overrides)
    comp, params = build(cfg)
    sft = stage_params(comp, cfg, "base", "sft", params)
    run = RunDir(cfg.run_root, cfg.name, cfg, fresh=True)
    stage = DPOStage(comp, run, "pref", 1, ("sft",))
    ck = Checkpointer(run.checkpoint_dir("pref"), max_to_keep=1, async_save=False)
    try:
        final = stage.run_stage(sft, ck)
    finally:
        ck.close()
    run.write_summary({f"pref/{k}": v for k, v in stage.summary.items()})
    run.close()
    print(json.dumps(stage.summary))
    analyse(name, overrides, comp, params, final)


def pairs(out: str, num: int = 20000, tries: int = 4) -> None:
    """On-policy rejected answers: `tries` samples at temperature 1 from the SFT policy for each training
    problem; the first wrong one is the rejected answer, a synthetic near miss where all were right."""
    cfg = config("base")
    comp, params = build(cfg)
    sft = stage_params(comp, cfg, "base", "sft", params)
    train_pairs = task_pairs(comp.task, "train", num, int(cfg.seed))
    examples = comp.task.examples("train", num, int(cfg.seed))
    ev = Evaluator(comp.module, comp.model_cfg, comp.env, comp.tokenizer, comp.task, examples,
                   max_prompt_len=int(cfg.pref.max_prompt_len), max_new_tokens=int(cfg.eval.max_new_tokens),
                   n_samples=tries, temperature=1.0, seed=int(cfg.seed) + 1, batch_size=2000)
    gen = ev.generate(sft)
    n_own = n_one = n_one_synth = 0
    one_digit = lambda a, b: len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1  # noqa: E731
    with open(out, "w") as f:
        for ex, pair, texts in zip(ev.examples, train_pairs, gen.texts):
            # an unfinished sample can decode to the gold text and still be scored wrong: not a rejected answer
            wrong = [t.strip() for t in texts
                     if not comp.task.is_correct(t, ex) and t.strip() not in ("", ex.answer)]
            rejected = wrong[0] if wrong else pair.rejected
            n_own += bool(wrong)
            n_one += one_digit(ex.answer, rejected)
            n_one_synth += one_digit(ex.answer, pair.rejected)
            f.write(json.dumps({"prompt": ex.prompt, "chosen": ex.answer, "rejected": rejected}) + "\n")
    held = task_pairs(comp.task, "test", int(cfg.pref.data.eval_pairs), int(cfg.seed))
    with open(pathlib.Path(out).parent / "heldout.jsonl", "w") as f:
        for p in held:
            f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n")
    print(f"{num} pairs, {n_own} with the policy's own wrong answer as rejected ({n_own / num:.1%}); "
          f"held-out synthetic pairs in {pathlib.Path(out).parent / 'heldout.jsonl'}; rejected one digit off the "
          f"gold: {n_one / num:.1%} (synthetic near misses: {n_one_synth / num:.1%})")


def report(names) -> None:
    keys = ("eval/accuracy", "eval/pref_accuracy", "eval/logps/chosen", "eval/logps/rejected",
            "eval/logps/chosen_per_token", "eval/logps/rejected_per_token")
    tkeys = ("logps/chosen", "logps/rejected", "logps/chosen_per_token", "logps/rejected_per_token")
    for name in names:
        recs = [json.loads(ln) for ln in (ROOT / name / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        recs = [r for r in recs if r.get("stage") == "pref"]
        train_at = {r["step"]: r for r in recs if "logps/chosen" in r}
        print(f"\n{name}\n| step | task acc | pref acc | held-out logp c / r (sum) | per token c / r "
              "| train logp c / r (sum) | per token c / r |\n|---|---|---|---|---|---|---|")
        for r in recs:
            if "eval/pref_accuracy" not in r:
                continue
            t = train_at.get(r["step"], {})
            tv = " | ".join(f"{t[a]:.2f} / {t[b]:.2f}" if a in t else "-" for a, b in (tkeys[:2], tkeys[2:]))
            print(f"| {r['step']} | {r['eval/accuracy']:.1%} | {r['eval/pref_accuracy']:.1%} | "
                  f"{r[keys[2]]:.2f} / {r[keys[3]]:.2f} | {r[keys[4]]:.3f} / {r[keys[5]]:.3f} | {tv} |")


def plot(out: str, names) -> None:
    """Held-out task accuracy, preference accuracy and chosen / rejected summed log-probs of the pref stage."""
    from jaxrl_llm.train.plots import _draw, _figure, read_metrics, series
    fig, axes = _figure(3, "DPO on digit addition (held-out, one seed)")
    for i, name in enumerate(names):
        recs = read_metrics(ROOT / name)
        for ax, key in zip(axes[:2], ("eval/accuracy", "eval/pref_accuracy")):
            _draw(ax, *series(recs, "pref", key), name, color=f"C{i}")
            ax.set_title(key)
        for side, style in (("chosen", "-"), ("rejected", ":")):
            _draw(axes[2], *series(recs, "pref", f"eval/logps/{side}"), f"{name} {side}", linestyle=style,
                  color=f"C{i}")
        axes[2].set_title("eval/logps (solid: chosen)")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=("train", "analyse", "pairs", "report", "plot"))
    ap.add_argument("names", nargs="+")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    if args.cmd == "train":
        train(args.names[0], args.set)
    elif args.cmd == "analyse":
        analyse(args.names[0], args.set)
    elif args.cmd == "pairs":
        pairs(args.names[0])
    elif args.cmd == "plot":
        plot(args.names[0], args.names[1:])
    else:
        report(args.names)
