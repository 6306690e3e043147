"""Expert iteration (rejection-sampling fine-tuning): search with the policy, keep what the verifier accepts,
fine-tune on it, repeat.

One round (one step of the stage, `rounds` in all):

    prompts  = next(iterator)                                  # prompts_per_round, the RL stages' iterator
    samples  = search(policy, prompts)                         # search.method "sample": search.n per prompt
    kept     = keep_verified(texts, examples, ...)             # task.is_correct, EOS-ended, distinct texts,
                                                               # at most keep_per_prompt per prompt
    policy   = sft_steps SFT updates on batches of `kept`      # algos.sft.make_sft_step, batch_size rows each

This is STaR (Zelikman et al. 2022, arXiv 2203.14465) without rationalisation, and ReST-EM (Singh et al. 2023,
arXiv 2312.06585) with two departures: the policy is fine-tuned further each round instead of restarting from
the base model, and the optimizer state carries over between rounds (`reset_optimizer=True` starts it, and its
learning-rate schedule, afresh every round). The SFT trains on the very tokens that were sampled (prompt as
the sampler saw it, completion up to and including its EOS), so nothing is lost to a decode/encode round trip;
a correct completion that did not end (no EOS within sampling.max_new_tokens) is not kept, since training on
it would teach the policy not to stop.

Batches: the round's kept pairs, in an order drawn from (seed, stage, round), cycled until the round's
sft_steps x batch_size rows are filled (a pair is seen about sft_steps x batch_size / kept times). A round
that keeps nothing (on any process) makes no update.

Metrics per round: search/solve_rate (prompts with at least one verified completion), search/accuracy
(verified completions / samples), search/kept, search/sampled_tokens (this round's generated tokens) and
search/sampled_tokens_total (over the stage so far: compare with an RL stage at equal sampling cost),
sft/steps, and the SFT step's metrics (loss, nll_token_mean, grad_norm, ...) averaged over the round's steps
(absent when the round made no update).

Randomness: round i samples with fold_in(fold_in(stage key, i), 0); its SFT step j uses
fold_in(fold_in(fold_in(stage key, i), 1), j). The round's data is a pure function of (seed, round, the
policy at the round's start), so resuming from a round's checkpoint equals never stopping.

Search methods (`search.method`):

* "sample": best-of-N sampling, search.n samples per prompt with the rollout sampler (`sampling` section);
* "beam" / "dvts": step-level beam search / diverse verifier tree search (`search.beam`) on the
  `StepDecoder`, guided by the process reward model of the earlier prm stage `search.prm_stage` (its final
  params, `load_prm_params`; steps end at that stage's separator). search.n = beam width (or subtrees) x
  `search.expansions` rows decode per round, the budget of best-of-n; the search.n / expansions final
  candidates of each prompt are verified like samples. A step has at most `search.step_tokens` tokens and a
  solution `sampling.max_new_tokens` (a multiple of it). Step search runs on one process.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np

from jaxrl_llm.algos import sft
from jaxrl_llm.algos.train_state import jit_update
from jaxrl_llm.rewards.rollout import rollout_examples
from jaxrl_llm.rollout.sampling import SamplingConfig
from jaxrl_llm.sharding import multihost
from jaxrl_llm.tasks.base import Example
from jaxrl_llm.tokenizer import decode_completions
from jaxrl_llm.train.build import make_evaluator, prompt_iterator, stage_sampler
from jaxrl_llm.train.config import ConfigError, optimizer_config, optimizer_from, to_dataclass
from jaxrl_llm.train.experience import encode_prompts, step_metrics
from jaxrl_llm.train.stage import Stage, StageKind
from jaxrl_llm.train.stages.rl import sampling_section
from jaxrl_llm.train.stages.sft import algo_config
from jaxrl_llm.train.validation import choice, divides, flag, integer, run_steps, short, unread

METHODS = ("sample", "beam", "dvts")
STEP_METHODS = ("beam", "dvts")


def expert_iteration_stage(rounds: int = 10, prompts_per_round: int = 64, n: int = 8, keep_per_prompt: int = 1,
                           sft_steps: int = 20, batch_size: int = 64, learning_rate: float = 1e-4,
                           max_new_tokens: int = 16, **kw) -> mc.ConfigDict:
    """An expert-iteration stage: `rounds` rounds of (search.n samples of each of prompts_per_round prompts,
    keep at most keep_per_prompt distinct verified ones per prompt, sft_steps SFT steps of batch_size kept
    pairs); `kw` sets other section keys."""
    s = mc.ConfigDict(dict(
        kind="expert_iteration", rounds=rounds, prompts_per_round=prompts_per_round, max_prompt_len=16,
        num_train_examples=0, search=search_section(n),
        sampling=sampling_section(max_new_tokens), keep_per_prompt=keep_per_prompt, sft_steps=sft_steps,
        batch_size=batch_size, num_micro_batches=1, loss_agg="token-mean",
        norm_length=mc.FieldReference(None, field_type=float), exclude_empty_rows=False, reset_optimizer=False,
        optimizer=optimizer_config(learning_rate)))
    s.update(kw)
    return s


def search_section(n: int = 8) -> mc.ConfigDict:
    """The `search` section: method, budget n, and the step-level keys (read by "beam" / "dvts" only)."""
    return mc.ConfigDict(dict(method="sample", n=n, prm_stage="", expansions=4, step_tokens=8))


def check_search(cfg: mc.ConfigDict, name: str) -> None:
    s, sw = cfg[name].search, f"config.{name}.search"
    choice(s.method, f"{sw}.method", METHODS, means="a search method of expert iteration")
    n = integer(s.n, f"{sw}.n", 1, means="samples (rows) per prompt", example=8)
    d = search_section()
    if s.method not in STEP_METHODS:
        for key in ("prm_stage", "expansions", "step_tokens"):
            unread(s, key, sw, d[key], f"by method={s.method!r} (only by the step-level 'beam' and 'dvts')")
        return
    unread(cfg[name].sampling, "slots", f"config.{name}.sampling", 0, f"by search.method={s.method!r} (step "
           "search decodes its beams in lockstep; continuous batching serves method='sample')")
    stages_before = tuple(cfg.stages)[:tuple(cfg.stages).index(name)] if name in cfg.stages else ()
    if s.prm_stage not in stages_before or cfg[s.prm_stage].get("kind") != "prm":
        earlier = [x for x in stages_before if cfg[x].get("kind") == "prm"]
        raise ConfigError(f"{sw}.prm_stage={s.prm_stage!r} must name a prm stage that runs before {name!r} (method="
                          f"{s.method!r} ranks partial solutions with its PRM); earlier prm stages: {earlier or 'none'}")
    e = integer(s.expansions, f"{sw}.expansions", 1, means="candidate next steps per beam per round", example=4)
    divides(n, f"{sw}.n", e, f"{sw}.expansions", "n rows per prompt = beam width (or subtrees) x expansions")
    st = integer(s.step_tokens, f"{sw}.step_tokens", 1, means="tokens per step at most", example=8)
    divides(int(cfg[name].sampling.max_new_tokens), f"config.{name}.sampling.max_new_tokens", st, f"{sw}.step_tokens",
            "a solution is at most max_new_tokens / step_tokens steps")


def check_section(s: mc.ConfigDict, where: str) -> None:
    """Every key of an expert_iteration section."""
    run_steps(s, "rounds", where, "expert-iteration rounds (search, then SFT)")
    integer(s.prompts_per_round, f"{where}.prompts_per_round", 1, means="prompts searched per round", example=64)
    integer(s.max_prompt_len, f"{where}.max_prompt_len", 1, means="prompt tokens", example=16)
    integer(s.num_train_examples, f"{where}.num_train_examples", 0,
            means="training prompts drawn from the task; 0 = 64 rounds' worth", example=0)
    sw = f"{where}.search"
    n = s.search.n
    sampling = to_dataclass(SamplingConfig, s.sampling, f"{where}.sampling")
    if sampling.temperature == 0 and n > 1:
        raise ConfigError(f"{where}.sampling.temperature=0.0 (greedy) with {sw}.n={n}: the {n} samples of a prompt "
                          f"would be identical; set {short(where)}.sampling.temperature > 0 (e.g. 1.0) or "
                          f"{short(sw)}.n=1")
    k = n // int(s.search.expansions) if s.search.method in STEP_METHODS else n
    integer(s.keep_per_prompt, f"{where}.keep_per_prompt", 1, k,
            means=f"distinct verified completions kept per prompt, at most the {k} candidates", example=1)
    integer(s.sft_steps, f"{where}.sft_steps", 1, means="SFT steps per round", example=20)
    integer(s.batch_size, f"{where}.batch_size", 1, means="kept pairs per SFT step", example=64)
    integer(s.num_micro_batches, f"{where}.num_micro_batches", 1, means="gradient-accumulation parts", example=1)
    divides(s.batch_size, f"{where}.batch_size", s.num_micro_batches, f"{where}.num_micro_batches",
            "each SFT step splits its pairs into num_micro_batches equal parts")
    flag(s.reset_optimizer, f"{where}.reset_optimizer")
    algo_config(s, where)
    optimizer_from(s.optimizer, f"{where}.optimizer")


def keep_verified(texts: Sequence[str], examples: Sequence[Example], finished: Sequence[bool], n: int,
                  keep_per_prompt: int, task) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(kept rows, correct [rows], solved [prompts]) of a prompt-major batch of n samples per prompt: a row is
    correct when `task.is_correct(text, example)`; kept when also EOS-ended, its text is not one kept before
    for the same prompt, and fewer than `keep_per_prompt` of that prompt are kept (first come, first kept).
    `solved`: the prompt has at least one correct sample."""
    correct = np.array([bool(task.is_correct(t, e)) for t, e in zip(texts, examples)], bool)
    kept: list[int] = []
    for p in range(len(texts) // n):
        seen: set[str] = set()
        for r in range(p * n, p * n + n):
            if correct[r] and finished[r] and texts[r] not in seen and len(seen) < keep_per_prompt:
                seen.add(texts[r])
                kept.append(r)
    return kept, correct, correct.reshape(-1, n).any(axis=1)


def batch_order(kept: int, rows: int, seed: Sequence[int]) -> np.ndarray:
    """`rows` indices into `kept` items: permutations drawn from `seed`, one after another."""
    rng = np.random.default_rng(list(seed))
    reps = -(-rows // kept)
    return np.concatenate([rng.permutation(kept) for _ in range(reps)])[:rows]


class ExpertIterationStage(Stage):
    kind = "expert_iteration"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        s, comp, where = self.section, self.comp, f"config.{self.name}"
        self.total_steps = int(s.rounds)
        self.n, self.prompts = int(s.search.n), int(s.prompts_per_round)
        n_train = max(int(s.num_train_examples), self.prompts * 64)
        self.examples = comp.task.examples("train", n_train, self.cfg.seed)
        self.iterator = prompt_iterator(comp, self.examples, self.prompts, self.cfg.seed + self.index)
        self.method, self.prm = s.search.method, None
        if self.method in STEP_METHODS:
            if jax.process_count() > 1:
                raise ConfigError(f"{where}.search.method={self.method!r} runs on one process; this run has "
                                  f"{jax.process_count()} (use method='sample')")
            self.decoder, self.separator = self._step_decoder()
            self.k = self.n // int(s.search.expansions)  # final candidates per prompt
        else:
            self.sampling, self.sampler = stage_sampler(comp, s.sampling, self.n)
            self.k = self.n
        self.opt_cfg = optimizer_from(s.optimizer, f"{where}.optimizer")
        self.step_fn = sft.make_sft_step(comp.module, comp.model_cfg, algo_config(s, where),
                                         num_micro_batches=int(s.num_micro_batches))
        self.update = None
        self.sampled_tokens = 0  # over the stage so far (in the checkpoints' meta)
        self.evaluator = make_evaluator(comp, s.max_prompt_len) if self.cfg.eval.every > 0 else None

    @classmethod
    def check_config(cls, cfg: mc.ConfigDict, name: str) -> None:
        check_search(cfg, name)
        check_section(cfg[name], f"config.{name}")

    def init(self, params) -> None:
        self.state = self.make_state(params, self.opt_cfg)
        if self.method in STEP_METHODS and self.prm is None:
            from jaxrl_llm.models import process_reward_model
            from jaxrl_llm.search.scorers import CachedPRMScorer
            from jaxrl_llm.train.stages.prm import load_prm_params
            prm = load_prm_params(self.comp, self.run, self.section.search.prm_stage, self.stages_before, params)
            self.prm = CachedPRMScorer(process_reward_model(self.comp.model_cfg), prm, self.decoder.cfg,
                                       env=self.comp.env)

    def _step_decoder(self):
        from jaxrl_llm.algos.prm import step_end_table
        from jaxrl_llm.search.decoding import StepConfig, StepDecoder
        from jaxrl_llm.train.stages.prm import stage_separator
        s, comp = self.section, self.comp
        separator = stage_separator(self.cfg[s.search.prm_stage], comp.task)
        try:
            table = step_end_table(comp.tokenizer, separator, comp.model_cfg.vocab_size)
        except ValueError as e:
            raise ConfigError(f"config.{s.search.prm_stage}.data.separator: {e}") from None
        st = int(s.search.step_tokens)
        sc = StepConfig(step_tokens=st, max_steps=int(s.sampling.max_new_tokens) // st,
                        temperature=float(s.sampling.temperature), top_k=int(s.sampling.top_k),
                        top_p=float(s.sampling.top_p), eos_token_ids=comp.eos_ids, pad_token_id=comp.pad_id)
        return StepDecoder(comp.module, comp.model_cfg, sc, table, env=comp.env,
                           param_shardings=comp.shardings), separator

    def _step_search(self, params, prompts, key) -> tuple[dict, list]:
        """beam / dvts candidates of this process's prompts as rollout-like rows (prompt-major, k per prompt)."""
        from jaxrl_llm.search.beam import beam_search, dvts
        e = int(self.section.search.expansions)
        pt, pm = multihost.local_rows(prompts.tokens), multihost.local_rows(prompts.mask).astype(np.int32)
        if self.method == "beam":
            res = beam_search(self.decoder, params, pt, pm, key, self.prm, beam_width=self.k, expansions=e)
        else:
            res = dvts(self.decoder, params, pt, pm, key, self.prm, subtrees=self.k, expansions=e)
        b, k, m = res.tokens.shape
        flat = lambda a: np.asarray(a).reshape((b * k,) + np.asarray(a).shape[2:])  # noqa: E731
        lengths = flat(res.lengths)
        rows = {"prompt_tokens": np.repeat(pt, k, axis=0), "prompt_mask": np.repeat(pm, k, axis=0),
                "tokens": flat(res.tokens), "lengths": lengths, "finished": flat(res.finished),
                "mask": (np.arange(m)[None, :] < lengths[:, None]).astype(np.int32)}
        return rows, [e_ for e_ in prompts.examples for _ in range(k)], int(res.generated_tokens)

    def meta(self) -> dict:
        return {**super().meta(), "sampled_tokens": self.sampled_tokens}

    def restore(self, tree: dict, meta: dict) -> None:
        super().restore(tree, meta)
        self.sampled_tokens = int(meta.get("sampled_tokens", 0))

    def round_key(self, i: int, which: int) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(self.key, i), which)

    def search(self, i: int, params) -> dict[str, Any]:
        """Round i's prompts, sampled with `params` and verified: this process's rows as numpy, the kept
        rows, and the round's search metrics (over every process)."""
        examples = next(self.iterator)
        prompts = encode_prompts(self.comp.tokenizer, self.comp.env, examples, int(self.section.max_prompt_len),
                                 self.prompts, chat=self.comp.chat)
        if self.method in STEP_METHODS:
            rows, row_examples, generated = self._step_search(params, prompts, self.round_key(i, 0))
        else:
            ro = self.sampler(params, prompts.tokens, prompts.mask, self.round_key(i, 0))
            rows = {k: multihost.local_rows(getattr(ro, k)) for k in ("prompt_tokens", "prompt_mask", "tokens",
                                                                      "mask", "lengths", "finished")}
            row_examples = rollout_examples(self.comp.env, ro, prompts.examples, self.n)
            generated = int(np.sum(rows["lengths"]))
        texts = decode_completions(self.comp.tokenizer, rows["tokens"], rows["mask"])
        kept, correct, solved = keep_verified(texts, row_examples, rows["finished"], self.k,
                                              int(self.section.keep_per_prompt), self.comp.task)
        total = lambda x: multihost.process_sum(float(x))  # noqa: E731
        tokens = int(total(generated))
        self.sampled_tokens += tokens
        metrics = {"search/solve_rate": total(np.sum(solved)) / self.prompts,
                   "search/accuracy": total(np.sum(correct)) / (self.prompts * self.k),
                   "search/kept": total(len(kept)), "search/sampled_tokens": float(tokens),
                   "search/sampled_tokens_total": float(self.sampled_tokens),
                   "response_length": total(np.sum(rows["lengths"])) / (self.prompts * self.k)}
        return {"rows": rows, "kept": kept, "texts": texts, "examples": row_examples, "correct": correct,
                "metrics": metrics, "empty_anywhere": total(len(kept) == 0) > 0}

    def step(self, i: int) -> dict:
        s = self.section
        if s.reset_optimizer and i > 0:  # a fresh optimizer (and schedule) every round
            self.state = self._fresh_optimizer(self.state)
        found = self.search(i, self.model_params())
        self._log_samples(i, found)
        metrics = dict(found["metrics"])
        if found["empty_anywhere"]:
            return {**metrics, "sft/steps": 0.0}
        bs, steps = int(s.batch_size), int(s.sft_steps)
        local = bs // multihost.data_shard(self.comp.env, bs)[1]
        order = batch_order(len(found["kept"]), steps * local, (self.cfg.seed, self.index, i, jax.process_index()))
        kept, rows = np.asarray(found["kept"]), found["rows"]
        sft_key, stacked = self.round_key(i, 1), []
        for j in range(steps):
            pick = kept[order[j * local:(j + 1) * local]]
            batch = multihost.to_global_tree(self.comp.env, {
                "prompt_tokens": rows["prompt_tokens"][pick], "prompt_mask": rows["prompt_mask"][pick],
                "completion_tokens": rows["tokens"][pick], "completion_mask": rows["mask"][pick]}, bs)
            if self.update is None:
                self.update = jit_update(self.step_fn, self.state, batch, self.comp.env)
            self.state, m = self.update(self.state, batch, jax.random.fold_in(sft_key, j))
            stacked.append(m)
        sft_metrics = step_metrics(jax.tree.map(lambda *x: jnp.stack(x), *stacked))
        return {**metrics, **sft_metrics, "sft/steps": float(steps)}

    def _fresh_optimizer(self, state):
        """`state` with a fresh optimizer state and step 0 (its params and frozen base kept)."""
        opt_state = jax.jit(state.tx.init)(state.params)
        return state.replace(opt_state=opt_state, step=jnp.zeros_like(state.step))

    def _log_samples(self, i: int, found: dict) -> None:
        every = self.cfg.log.samples_every
        if every <= 0 or (i + 1) % every or jax.process_index() != 0:
            return
        kept = set(found["kept"])
        k = min(int(self.cfg.log.num_samples), len(found["texts"]))
        self.run.log_samples(self.name, i + 1, [
            {"prompt": found["examples"][r].prompt, "completion": found["texts"][r],
             "correct": bool(found["correct"][r]), "finished": bool(found["rows"]["finished"][r]),
             "kept": r in kept} for r in range(k)])


def memory(cfg, s, z) -> dict[str, int]:
    p, n, num_micro = int(s.max_prompt_len), int(s.sampling.max_new_tokens), int(s.num_micro_batches)
    micro = z.rows(int(s.batch_size) // num_micro)
    trained = z.trained("policy")  # all of it, or LoRA's adapters
    t = {"params": z.params("policy"), "input_params": z.copy("policy"),
         "optimizer": z.optimizer(s.optimizer, trained), "gradients": z.gradients(trained, num_micro),
         "activations": z.activations(micro, p + n), "logprob_chunks": z.head(micro, n, sft.SFTConfig().logprob_chunk,
                                                                              True)}
    t.update(z.rollout_terms(int(s.prompts_per_round) * int(s.search.n), int(s.prompts_per_round), p, n, s.sampling))
    if s.search.method in STEP_METHODS:  # the PRM that ranks the steps (its own KV cache about the decoder's)
        t["reward_model"] = z.params("value")
    return t | z.eval_terms(cfg, s)


KIND = StageKind("expert_iteration", ExpertIterationStage, expert_iteration_stage, memory,
                 update_rows=lambda s: int(s.batch_size), micro_batch_key="num_micro_batches", algo=algo_config)
