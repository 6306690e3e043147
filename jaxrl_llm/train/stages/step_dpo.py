"""Step-level DPO on pairs that MCTS finds (kind "step_dpo"): siblings with a Q gap become preference pairs.

    c.step = step_dpo_stage(steps=100, batch_size=16, learning_rate=1e-5, beta=0.1)
    c.step.search.simulations, c.step.search.min_q_gap = 16, 0.3

At the start of the stage (and again, identically, on a resume: the data is a pure function of the policy
the stage starts from, the config and the seed) MCTS (`search.mcts`) runs over `search.num_problems`
problems of the task's train split with the starting policy. Leaf values come from rollouts to the end
scored by the task's verifier (`search.value="verifier"`: each new step is completed greedily and scored 1 if
the final answer is right, else 0), or from an earlier PRM stage of the run (`search.value="<prm stage
name>"`: its score of the new step). Every pair of siblings (the same parent prefix) whose Q values differ by
at least `search.min_q_gap` is a pair: prompt = the problem's prompt + the path to the parent (tokens, as
searched: nothing is re-tokenised), chosen = the higher-Q step, rejected = the lower (rStar-Math's step-level
preference pairs, arXiv 2501.04519; Step-DPO, Lai et al. 2024, arXiv 2406.18629). The pairs train the policy
with the DPO family's losses (`algo`, as the "dpo" kind: sigmoid, ipo, ..., beta), against the starting policy
as the reference. Held-out pairs come from `search.eval_problems` problems of the test split (their
preference accuracy is logged as eval/pref_accuracy, as a dpo stage does).

Lengths: max_prompt_len must hold a prompt and (search.max_steps - 1) * search.step_tokens path tokens,
max_response_len one step (search.step_tokens); both are checked before anything runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections as mc
import numpy as np

from jaxrl_llm.errors import ConfigError
from jaxrl_llm.train.build import encode_prompt_batch, prompt_iterator
from jaxrl_llm.train.stage import StageKind
from jaxrl_llm.train.stages.preference import DPOStage, dpo_algo, dpo_memory, dpo_stage
from jaxrl_llm.train.validation import enough_rows, integer, number, supervised_batches

CHUNK = 8  # problems searched at once (one compiled shape; the last chunk is padded)


def search_section() -> mc.ConfigDict:
    return mc.ConfigDict(dict(num_problems=64, eval_problems=16, simulations=16, expansions=4, step_tokens=8,
                              max_steps=6, temperature=1.0, c_puct=1.0, min_q_gap=0.3, value="verifier"))


def step_dpo_stage(loss_type: str = "sigmoid", steps: int = 100, batch_size: int = 16, learning_rate: float = 1e-5,
                   max_prompt_len: int = 64, max_response_len: int = 8, **algo_kw) -> mc.ConfigDict:
    """A step-level DPO stage on MCTS sibling pairs; `algo_kw` sets `dpo.DPOConfig` fields (beta, ...)."""
    s = dpo_stage(loss_type, steps, batch_size, learning_rate, max_prompt_len, max_response_len, **algo_kw)
    s.kind = "step_dpo"
    del s["data"]
    s.search = search_section()
    return s


def check_search_keys(s: mc.ConfigDict, where: str) -> None:
    g, gw = s.search, f"{where}.search"
    unknown = sorted(set(g.keys()) - set(search_section().keys()))
    if unknown:
        raise ConfigError(f"{gw}.{unknown[0]} is not a key of a step_dpo search section; expected one of "
                          f"{tuple(search_section().keys())}")
    for key, lo, ex in (("num_problems", 1, 64), ("eval_problems", 0, 16), ("simulations", 1, 16),
                        ("expansions", 2, 4), ("step_tokens", 1, 8), ("max_steps", 1, 6)):
        integer(g[key], f"{gw}.{key}", lo, example=ex)
    number(g.temperature, f"{gw}.temperature", 0.0, lo_open=True, means="> 0: siblings must differ", example=1.0)
    number(g.c_puct, f"{gw}.c_puct", 0.0, example=1.0)
    number(g.min_q_gap, f"{gw}.min_q_gap", 0.0, lo_open=True, example=0.3)
    if not isinstance(g.value, str) or not g.value:
        raise ConfigError(f"{gw}.value={g.value!r}: 'verifier' (rollouts scored by the task) or the name of an "
                          "earlier prm stage")
    if int(s.max_response_len) < int(g.step_tokens):
        raise ConfigError(f"{where}.max_response_len={s.max_response_len} is shorter than one step "
                          f"({gw}.step_tokens={g.step_tokens}); set max_response_len >= step_tokens")


class StepDPOStage(DPOStage):
    kind = "step_dpo"

    @classmethod
    def check_config(cls, cfg: mc.ConfigDict, name: str) -> None:
        s, where = cfg[name], f"config.{name}"
        supervised_batches(s, where, "training steps", "pairs", 16)
        dpo_algo(s, where)
        check_search_keys(s, where)
        value = s.search.value
        if value != "verifier":
            stages = tuple(cfg.stages)
            if value not in stages or cfg[value].kind != "prm" or stages.index(value) > stages.index(name):
                raise ConfigError(f"{where}.search.value={value!r}: not 'verifier' nor a prm stage before {name!r} "
                                  f"(stages {stages})")
        from jaxrl_llm.train.config import optimizer_from
        optimizer_from(s.optimizer, f"{where}.optimizer")

    @classmethod
    def check_data(cls, cfg: mc.ConfigDict, name: str, task) -> None:
        if task is not None and not hasattr(task, "step_separator"):
            raise ConfigError(f"config.{name}: task {getattr(task, 'name', type(task).__name__)!r} has no "
                              "step_separator (the SteppedTask ability, e.g. chain_arithmetic): MCTS needs steps")

    def __init__(self, *a, **kw):
        super().__init__(*a, with_data=False, **kw)
        self._finished = False

    def run_stage(self, prev_params, checkpointer) -> Any:
        latest = checkpointer.latest_step()
        self._finished = latest is not None and bool(checkpointer.read_meta(latest).get("done"))
        return super().run_stage(prev_params, checkpointer)

    def init(self, params) -> None:
        if self.arrays is None and not self._finished and self.run is not None:
            self._make_pairs(params)
        super().init(params)

    # --- the pairs

    def _searchers(self, params):
        """(sampling decoder, greedy rollout decoder, value_fn(examples) -> the MCTS value function of a chunk),
        built once for the stage's pairs: one set of compiled programs for the train and held-out searches."""
        from jaxrl_llm.models import process_reward_model
        from jaxrl_llm.search.decoding import StepConfig, StepDecoder
        from jaxrl_llm.search.scorers import prm_scorer, verifier_scorer
        from jaxrl_llm.train.stages.prm import load_prm_params

        s, g, comp = self.section, self.section.search, self.comp
        sc = StepConfig(step_tokens=int(g.step_tokens), max_steps=int(g.max_steps), temperature=float(g.temperature),
                        eos_token_ids=comp.eos_ids, pad_token_id=comp.pad_id)
        dec, greedy = (StepDecoder(comp.module, comp.model_cfg, c, self._table, env=comp.env,
                                   param_shardings=comp.shardings)
                       for c in (sc, dataclasses.replace(sc, temperature=0.0)))
        p_len = int(s.max_prompt_len)  # every chunk's prompts are padded to it
        if g.value == "verifier":
            return dec, greedy, lambda examples: verifier_scorer(comp.tokenizer, comp.task, examples, p_len)
        prm = load_prm_params(comp, self.run, g.value, tuple(self.cfg.stages), params)
        score = prm_scorer(process_reward_model(comp.model_cfg), prm, self._table, p_len, how="last")
        return dec, greedy, lambda examples: score

    def _pairs_of(self, params, searchers, split: str, num: int, salt: int) -> tuple[dict[str, np.ndarray], dict]:
        from jaxrl_llm.search.mcts import mcts, sibling_pairs

        s, g, comp = self.section, self.section.search, self.comp
        dec, greedy, value_fn = searchers
        leaf = "rollout" if g.value == "verifier" else "value"
        examples = comp.task.examples(split, num, int(self.cfg.seed))
        p_len, n_resp = int(s.max_prompt_len), int(s.max_response_len)
        rows = {"prompt": [], "chosen": [], "rejected": []}
        stats = {"problems": 0, "solved": 0, "tokens": 0, "too_long": 0}
        for c, start in enumerate(range(0, len(examples), CHUNK)):
            batch = examples[start:start + CHUNK]
            valid = len(batch)
            batch = batch + [batch[0]] * (CHUNK - valid)
            toks, mask, _ = encode_prompt_batch(comp, batch, p_len)
            toks, mask = np.asarray(jax.device_get(toks)), np.asarray(jax.device_get(mask))
            key = jax.random.fold_in(jax.random.fold_in(self.key, salt), c)
            res = mcts(dec, params, toks, mask, key, value_fn(batch),
                       simulations=int(g.simulations), expansions=int(g.expansions), c_puct=float(g.c_puct),
                       leaf=leaf, rollout_decoder=greedy if leaf == "rollout" else None)
            stats["problems"] += valid
            stats["tokens"] += int(res.generated_tokens[:valid].sum())
            stats["solved"] += int(sum(bool((res.terminal[i] & (res.q[i] >= 1.0 - 1e-6)).any())
                                       for i in range(valid)))
            for pair in sibling_pairs(res, float(g.min_q_gap)):
                if pair.problem >= valid:
                    continue
                if len(pair.prefix) > p_len:
                    stats["too_long"] += 1
                    continue
                rows["prompt"].append(pair.prefix)
                rows["chosen"].append(pair.chosen[:n_resp])
                rows["rejected"].append(pair.rejected[:n_resp])
        return _arrays(rows, p_len, n_resp, comp.pad_id), stats

    def _make_pairs(self, params) -> None:
        from jaxrl_llm.algos.prm import step_end_table
        g = self.section.search
        self._table = step_end_table(self.comp.tokenizer, self.comp.task.step_separator, self.comp.model_cfg.vocab_size)
        searchers = self._searchers(params)
        self.arrays, st = self._pairs_of(params, searchers, "train", int(g.num_problems), 0x57E9)
        n = len(self.arrays["prompt_tokens"])
        self.summary.update({"pairs/train": n, "mcts/problems": st["problems"],
                             "mcts/solved": st["solved"] / max(st["problems"], 1),
                             "mcts/generated_tokens": st["tokens"], "pairs/prefix_too_long": st["too_long"]})
        if n < int(self.section.batch_size):
            enough_rows(n, f"{self.where}: MCTS sibling pairs with a Q gap >= search.min_q_gap="
                        f"{g.min_q_gap} (raise search.num_problems or search.simulations, or lower min_q_gap)",
                        int(self.section.batch_size), f"{self.where}.batch_size")
        if int(g.eval_problems) > 0:
            held, _ = self._pairs_of(params, searchers, "test", int(g.eval_problems), 0x7E57)
            self.eval_arrays = held if len(held["prompt_tokens"]) else None
            self.summary["pairs/held_out"] = len(held["prompt_tokens"])
        self.iterator = prompt_iterator(self.comp, np.arange(n), int(self.section.batch_size),
                                        self.cfg.seed + self.index)


def _arrays(rows: dict[str, list], p_len: int, n_resp: int, pad: int) -> dict[str, np.ndarray]:
    """Left-padded prompts [N, p_len] and right-padded chosen / rejected steps [N, n_resp], with masks."""
    n = len(rows["prompt"])
    out = {"prompt_tokens": np.full((n, p_len), pad, np.int32), "prompt_mask": np.zeros((n, p_len), np.int32)}
    for i, p in enumerate(rows["prompt"]):
        out["prompt_tokens"][i, p_len - len(p):] = p
        out["prompt_mask"][i, p_len - len(p):] = 1
    for side in ("chosen", "rejected"):
        t, m = np.full((n, n_resp), pad, np.int32), np.zeros((n, n_resp), np.int32)
        for i, r in enumerate(rows[side]):
            t[i, :len(r)], m[i, :len(r)] = r, 1
        out[f"{side}_tokens"], out[f"{side}_mask"] = t, m
    return out


KIND = StageKind("step_dpo", StepDPOStage, step_dpo_stage, dpo_memory, update_rows=lambda s: int(s.batch_size),
                 micro_batch_key="num_micro_batches", logprob_chunk_key="algo.logprob_chunk", algo=dpo_algo)
