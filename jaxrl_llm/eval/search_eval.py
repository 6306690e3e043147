"""Accuracy against test-time compute: greedy, best-of-N (majority, ORM, PRM, PRM-weighted vote), PRM-guided
beam search, DVTS and MCTS on the same held-out problems, at matched budgets of generated tokens.

    rows = evaluate_search(policy, tokenizer, task, examples, SearchEvalConfig(budgets=(4, 16, 64)),
                           prm=(prm_module, prm_params), orm=(rm_module, rm_params), step_ends=table)
    print(search_table(rows)); plot_search(rows, "scaling.png")

"verifier" picks by the task's own verifier: pass@k, the bound any selection of the same samples reaches.
A budget k means k candidate solutions' worth of sampling per problem: best-of-k; beam search with k / E beams
of E expansions each (k rows in lock step); DVTS with k / E subtrees of E expansions; MCTS with a budget of
k * (greedy's mean tokens per problem) generated tokens. Every row of the result reports the tokens each
method actually generated per problem, so the comparison is at the measured compute, not the nominal one.
A method whose scorer is missing (no PRM, no ORM) is skipped and listed in the result.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np

from jaxrl_llm.errors import ConfigError
from jaxrl_llm.rollout import make_sampler
from jaxrl_llm.search.beam import SearchResult, beam_search, dvts
from jaxrl_llm.search.best_of_n import choose, sample_candidates
from jaxrl_llm.search.decoding import StepConfig, StepDecoder
from jaxrl_llm.search.mcts import mcts, path_tokens
from jaxrl_llm.search.scorers import CachedPRMScorer, orm_scorer, prm_scorer, step_grade_scorer, verifier_scorer
from jaxrl_llm.tasks.base import Example
from jaxrl_llm.data.iterator import tokenize_batch
from jaxrl_llm.tokenizer import decode_completions

METHODS = ("majority", "verifier", "orm", "prm", "prm_vote", "beam", "dvts", "mcts")
NEEDS = {"orm": "orm", "prm": "prm", "prm_vote": "prm", "beam": "prm", "dvts": "prm", "mcts": "prm"}


@dataclasses.dataclass(frozen=True)
class SearchEvalConfig:
    """budgets: candidate solutions' worth of compute per problem (each a multiple of `expansions` for the tree
    searches). step: how steps are sampled (step length, step count, temperature). prm_agg: how a PRM ranks
    whole solutions in best-of-N ("min" / "prod" / "mean" / "last"); tree searches rank prefixes by the last
    step. batch_size: problems searched at once (one compiled shape; the last chunk is padded)."""

    budgets: tuple[int, ...] = (4, 16)
    methods: tuple[str, ...] = METHODS
    expansions: int = 4
    step: StepConfig = StepConfig()
    prm_agg: str = "min"
    batch_size: int = 16
    max_prompt_len: int = 32
    mcts_c_puct: float = 1.0

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ConfigError(f"search eval methods {bad}: expected any of {METHODS}")
        for k in self.budgets:
            if not isinstance(k, int) or k < 1:
                raise ConfigError(f"search eval budget {k!r}: must be an integer >= 1")


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _texts(tokenizer, res_tokens: np.ndarray, res_lengths: np.ndarray) -> list[str]:
    mask = (np.arange(res_tokens.shape[-1])[None, :] < res_lengths[:, None]).astype(np.int32)
    return decode_completions(tokenizer, res_tokens, mask)


def evaluate_search(policy: tuple[Any, Any, Any], tokenizer, task, examples: Sequence[Example],
                    cfg: SearchEvalConfig, *, step_ends: np.ndarray, prm: tuple[Any, Any] | None = None,
                    orm: tuple[Any, Any] | None = None, env=None, param_shardings=None, chat: bool | None = None,
                    seed: int = 0) -> list[dict]:
    """Rows {method, budget, accuracy, tokens_per_problem, problems}: greedy once, then every method at every
    budget. policy = (module, model_cfg, params); prm / orm = (module, params); prm="oracle" scores steps with
    the task's true grades (`search.scorers.step_grade_scorer`: the bound a learned PRM approaches)."""
    module, model_cfg, params = policy
    sc = cfg.step
    enc = tokenize_batch(tokenizer, list(examples), cfg.max_prompt_len, chat=chat)  # chat None: by prompt type
    p = enc.tokens.shape[1]
    n = len(examples)
    bs = min(cfg.batch_size, n)
    key = jax.random.key(seed)
    dec = StepDecoder(module, model_cfg, sc, step_ends, env=env, param_shardings=param_shardings)
    prm_sc = prm_last = prm_steps = orm_sc = None
    oracle = isinstance(prm, str)
    if oracle and prm != "oracle":
        raise ConfigError(f"search eval prm={prm!r}: a (module, params) pair or 'oracle' (the task's step grades)")
    if prm is not None and not oracle:
        prm_sc = prm_scorer(prm[0], prm[1], step_ends, p, how=cfg.prm_agg)
        prm_last = prm_scorer(prm[0], prm[1], step_ends, p, how="last")  # MCTS's leaf values
        prm_steps = CachedPRMScorer(prm[0], prm[1], sc, env=env)  # beam search and DVTS: fed step by step
    if orm is not None:
        orm_sc = orm_scorer(*orm)

    def batches():
        for start, stop in _chunks(n, bs):
            idx = np.arange(start, start + bs).clip(max=stop - 1)  # pad the last chunk by repeating its end
            yield start, stop, enc.tokens[idx], enc.mask[idx].astype(np.int32), [examples[i] for i in idx]

    def correct_of(texts: list[str], exs: list[Example]) -> np.ndarray:
        return np.asarray([task.is_correct(t, e) for t, e in zip(texts, exs)], bool)

    rows: list[dict] = []
    skipped: list[str] = []

    def record(method: str, budget: int, correct: list[np.ndarray], tokens: float):
        c = np.concatenate(correct)[:n]
        rows.append({"method": method, "budget": budget, "accuracy": float(c.mean()),
                     "tokens_per_problem": tokens / n, "problems": n})

    # Greedy: one solution per problem, the reference budget.
    greedy = make_sampler(module, model_cfg, sc.sampling(temperature=0.0, n_samples=1), env=env,
                          param_shardings=param_shardings)
    corr, toks = [], 0
    for start, stop, pt, pm, exs in batches():
        c = sample_candidates(greedy, params, pt, pm, key)
        texts = _texts(tokenizer, c.tokens[:, 0], c.lengths[:, 0])
        corr.append(correct_of(texts, exs)[: stop - start])
        toks += int(c.lengths[: stop - start, 0].sum())
    record("greedy", 1, corr, toks)
    greedy_tokens = toks / n

    for budget in cfg.budgets:
        sampler = None
        for method in cfg.methods:
            need = NEEDS.get(method)
            if need == "prm" and prm is None or need == "orm" and orm is None:
                skipped.append(f"{method}@{budget} (no {need.upper()})")
                continue
            tree = method in ("beam", "dvts", "mcts")
            if tree and method != "mcts" and budget % cfg.expansions:
                skipped.append(f"{method}@{budget} (budget not a multiple of expansions={cfg.expansions})")
                continue
            if not tree and sampler is None:
                sampler = make_sampler(module, model_cfg, sc.sampling(n_samples=budget), env=env,
                                       param_shardings=param_shardings)
            corr, toks = [], 0
            for j, (start, stop, pt, pm, exs) in enumerate(batches()):
                k = jax.random.fold_in(jax.random.fold_in(key, budget), j)
                ver_sc = verifier_scorer(tokenizer, task, exs, p) if method == "verifier" else None
                if oracle:  # the task's true step grades, on the host, for this chunk's examples
                    prm_sc = step_grade_scorer(tokenizer, task, exs, p, how=cfg.prm_agg)
                    prm_last = prm_steps = step_grade_scorer(tokenizer, task, exs, p, how="last")
                res = _run(method, budget, cfg, dec, sampler, params, pt, pm, k, prm_sc, prm_last, prm_steps,
                           orm_sc if method == "orm" else ver_sc, greedy_tokens)
                texts = [_texts(tokenizer, res.tokens[b], res.lengths[b]) for b in range(len(exs))]
                pick = _pick(method, res, texts, task)
                chosen = [texts[b][pick[b]] for b in range(len(exs))]
                corr.append(correct_of(chosen, exs)[: stop - start])
                toks += res.generated_tokens * (stop - start) / len(exs)
            record(method, budget, corr, toks)
    if skipped:
        rows.append({"method": "skipped", "budget": 0, "accuracy": math.nan, "tokens_per_problem": math.nan,
                     "problems": n, "skipped": skipped})
    return rows


def _run(method, budget, cfg, dec, sampler, params, pt, pm, key, prm_sc, prm_last, prm_steps, outcome_sc,
         greedy_tokens) -> SearchResult:
    """One search of a chunk of problems; outcome_sc scores whole solutions for "orm" / "verifier"."""
    e = cfg.expansions
    if method == "beam":
        return beam_search(dec, params, pt, pm, key, prm_steps, beam_width=budget // e, expansions=e)
    if method == "dvts":
        res = dvts(dec, params, pt, pm, key, prm_steps, subtrees=budget // e, expansions=e)
        return _rescore(res, prm_sc, pt, pm)
    if method == "mcts":  # the token budget binds first: simulations is an upper bound
        out = mcts(dec, params, pt, pm, key, prm_last, simulations=budget * dec.cfg.max_steps, expansions=e,
                   c_puct=cfg.mcts_c_puct, max_generated_tokens=int(math.ceil(budget * greedy_tokens)))
        return mcts_answer(out)
    cands = sample_candidates(sampler, params, pt, pm, key)
    scorer = {"orm": outcome_sc, "verifier": outcome_sc, "prm": prm_sc, "prm_vote": prm_sc}.get(method)
    return cands if scorer is None else _rescore(cands, scorer, pt, pm)


def mcts_answer(out) -> SearchResult:
    """One candidate per problem from an MCTS tree: the whole solution (terminal node) with the highest Q
    (ties: more visits, then the lower node), or the best path when the tree holds no whole solution."""
    b, m = out.tokens.shape
    tokens, lengths = out.tokens.copy(), out.lengths.copy()
    q, fin, steps = out.best_q.astype(np.float32).copy(), out.best_terminal.copy(), np.zeros(b, np.int32)
    for i in range(b):
        nodes = np.flatnonzero(out.terminal[i, : out.num_nodes[i]])
        if nodes.size:
            node = nodes[np.lexsort((nodes, -out.visits[i, nodes], -out.q[i, nodes]))[0]]
            path = path_tokens(out, i, int(node))
            tokens[i, :] = 0
            tokens[i, : len(path)] = path
            lengths[i], q[i], fin[i], steps[i] = len(path), out.q[i, node], out.finished[i, node], out.depth[i, node]
    one = lambda a: np.asarray(a)[:, None]  # noqa: E731
    return SearchResult(tokens=tokens[:, None], lengths=one(lengths), scores=one(q), finished=one(fin),
                        num_steps=one(steps), logprob=np.zeros((b, 1), np.float32), best=np.zeros(b, np.int32),
                        generated_tokens=int(out.generated_tokens.sum()), rounds=int(out.simulations.max()))


def _rescore(res: SearchResult, scorer, pt, pm) -> SearchResult:
    """The candidates scored by `scorer` over prompt + whole solution."""
    b, k, m = res.tokens.shape
    tokens = np.concatenate([np.repeat(pt, k, axis=0), res.tokens.reshape(b * k, m)], axis=1)
    gmask = (np.arange(m)[None, :] < res.lengths.reshape(-1)[:, None]).astype(np.int32)
    mask = np.concatenate([np.repeat(pm, k, axis=0), gmask], axis=1)
    scores = np.asarray(jax.device_get(scorer(tokens, mask)), np.float32).reshape(b, k)
    return dataclasses.replace(res, scores=scores, best=choose("score", scores=scores))


def _pick(method: str, res: SearchResult, texts: list[list[str]], task) -> np.ndarray:
    if method in ("majority", "prm_vote"):
        answers = [[task.extract_answer(t) for t in row] for row in texts]
        return choose("majority" if method == "majority" else "weighted_majority", answers,
                      None if method == "majority" else res.scores)
    return res.best


def search_table(rows: list[dict]) -> str:
    """A markdown table: one row per method, one column per budget (accuracy %, tokens per problem)."""
    data = [r for r in rows if r["method"] != "skipped"]
    budgets = sorted({r["budget"] for r in data if r["method"] != "greedy"})
    methods = [m for m in dict.fromkeys(r["method"] for r in data)]
    head = "| method | " + " | ".join(f"{k}x" for k in budgets) + " |"
    lines = [head, "|---|" + "---:|" * len(budgets)]
    for m in methods:
        cells = []
        for k in budgets:
            r = [x for x in data if x["method"] == m and (x["budget"] == k or m == "greedy")]
            cells.append(f"{100 * r[0]['accuracy']:.1f}% ({r[0]['tokens_per_problem']:.0f} tok)" if r else "-")
        if m == "greedy":
            cells = [cells[0]] + ["" for _ in budgets[1:]]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    skipped = [s for r in rows if r["method"] == "skipped" for s in r["skipped"]]
    if skipped:
        lines.append(f"\nskipped: {', '.join(skipped)}")
    return "\n".join(lines)


def plot_search(rows: list[dict], path: str, title: str = "") -> None:
    """Accuracy against generated tokens per problem (log x), one line per method; greedy as a point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    data = [r for r in rows if r["method"] != "skipped"]
    for m in dict.fromkeys(r["method"] for r in data):
        pts = sorted((r["tokens_per_problem"], 100 * r["accuracy"]) for r in data if r["method"] == m)
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=m, linestyle="none" if m == "greedy" else "-")
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per problem")
    ax.set_ylabel("held-out accuracy (%)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
