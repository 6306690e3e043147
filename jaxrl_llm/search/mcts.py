"""Monte Carlo tree search over solution steps (PUCT, as in AlphaZero), batched over problems.

    res = mcts(decoder, params, prompt_tokens, prompt_mask, key, value_fn, simulations=32, expansions=4)
    res.tokens[b, :res.lengths[b]]                  # the best path of problem b (most visited child per level)
    pairs = sibling_pairs(res, min_q_gap=0.2)       # step-level preference pairs for DPO

A node is a step (`search.decoding`: tokens up to a separator, an EOS or `step_tokens`); the root is the
prompt. All B trees grow in lock step: one simulation picks one leaf per problem.

Selection: from the root, the child a of s maximising the PUCT score

    Q(s, a) + c_puct * P(s, a) * sqrt(N(s)) / (1 + N(s, a))

until a leaf (a node not expanded yet, or a terminal one). P(s, a) is the prior: the softmax over the
siblings of their step log-probs divided by `prior_temperature` (log-probs under the sampling policy,
`SearchState.logprob`), i.e. the policy's probabilities renormalised over the sampled candidates. Every
child is evaluated when it is created, so N(s, a) >= 1 and Q(s, a) always exists (no "first play urgency"
default is needed). Ties go to the lower child index.

Expansion: the leaf's path (its steps from the root, concatenated, right-padded to (max_steps - 1) *
step_tokens columns) is fed with `decoder.append` on top of the problem's root state (the prompt is
prefilled once, by `decoder.start`), each row is repeated K = `expansions` times (`decoder.select`) and one
`decoder.extend` samples K candidate next steps for all B problems. Identical candidates are merged into one
child (`dedupe`). A child is terminal when its step ended with an EOS or it is at depth max_steps.

Evaluation: `value_fn(tokens, mask) -> [B * K]` on the prompt + path + new step of every candidate (leaf
"value": e.g. a PRM), or on the candidate completed by further `extend`s until an EOS or max_steps steps
(leaf "rollout": e.g. the task's verifier, host-side; `rollout_decoder` may sample differently, e.g. greedily).
A child's own value is the mean over its merged copies.

Backup, and what the counts mean: the value backed up from a simulation is the mean of its K candidates'
values (or, when the selected leaf is terminal, that leaf's own value again). It is added to W and 1 to N of
the leaf and of every ancestor up to the root; each new child starts with N = 1 and W = its own value. So
    N(root) = the simulations run, and N(node) = 1 + the simulations whose leaf was the node or below it,
and Q = W / N is the mean of the node's own value and the values backed up through it. `leaves` and
`backed_up` record every simulation, so all of this can be recomputed from the result.

Budget: `simulations` per problem; optionally `max_generated_tokens` per problem (a problem whose count has
reached it stops; the others go on). The tree has room for 1 + simulations * expansions nodes per problem.

Cost model, per simulation (B problems, K rows each): one `append` forward of B rows x (max_steps - 1) *
step_tokens path columns on top of the cached prompt (the path is re-encoded, which costs far less memory
than keeping a KV cache per node), one `select` (a gather of B * K rows of the cache, P + M slots each),
one `extend` of B * K rows (at most `step_tokens` decode steps), the value function over B * K rows of
P + M tokens, and in "rollout" mode up to max_steps - 1 - depth more extends. Host: one small transfer of
the new steps and the values, and O(depth * K) numpy per problem. Compiled programs: start, append,
select, extend (plus the rollout decoder's extend) once each, whatever the budget: every call has fixed
shapes (marking rows done between calls is one small eager op). In "rollout" mode the cache gets (max_steps - 1) * step_tokens more slots, so a padded path plus
a whole solution fit. Deterministic for `key`: simulation s uses fold_in(key, s).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm.errors import ConfigError
from jaxrl_llm.search.decoding import SearchState, StepDecoder, check_count
from jaxrl_llm.tokenizer import decode_completions

# (tokens [R, T], mask [R, T]) of prompt + generated tokens (jax arrays) -> float [R], higher is better.
ValueFn = Callable[[Any, Any], Any]
LEAF_MODES = ("value", "rollout")
BEST_RULES = ("visits", "q")


@dataclasses.dataclass(frozen=True)
class MCTSResult:
    """The search trees of B problems (numpy). C = 1 + simulations * expansions node slots per problem;
    node 0 is the root (the prompt), slots from `num_nodes[b]` on are unused.

    Best path (from the root, the most visited child at each level, ties to the higher Q, or with
    best="q" the highest Q, ties to more visits): tokens int32 [B, M] (its steps concatenated, pad after
    `lengths`), lengths int32 [B], best_nodes int32 [B, max_steps + 1] (node ids from the root, -1 after the
    last), best_q float [B] (Q of its last node), best_terminal bool [B] (it is a whole solution).
    Nodes: parent int32 [B, C] (-1 for the root), depth int32 [B, C] (steps from the root), children int32
    [B, C, K] (-1 after the last), prior [B, C], visits int32 [B, C], q [B, C] (W / N), value [B, C] (the
    node's own value at creation), terminal bool [B, C], finished bool [B, C] (the step ended with an EOS),
    step_tokens int32 [B, C, step_tokens], step_lengths int32 [B, C], step_logprob [B, C], path_lengths
    int32 [B, C] (tokens from the root to the node included), num_nodes int32 [B].
    Record: leaves int32 [B, S] (the leaf of each simulation, -1 when the problem had stopped), backed_up
    [B, S] (the value backed up from it); simulations int32 [B] run per problem; generated_tokens int64
    [B] (every token the extends wrote for the problem, rollouts included); prompt_tokens / prompt_mask
    [B, P] as given.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    best_nodes: np.ndarray
    best_q: np.ndarray
    best_terminal: np.ndarray
    parent: np.ndarray
    depth: np.ndarray
    children: np.ndarray
    prior: np.ndarray
    visits: np.ndarray
    q: np.ndarray
    value: np.ndarray
    terminal: np.ndarray
    finished: np.ndarray
    step_tokens: np.ndarray
    step_lengths: np.ndarray
    step_logprob: np.ndarray
    path_lengths: np.ndarray
    num_nodes: np.ndarray
    leaves: np.ndarray
    backed_up: np.ndarray
    simulations: np.ndarray
    generated_tokens: np.ndarray
    prompt_tokens: np.ndarray
    prompt_mask: np.ndarray


class _Trees:
    """The B trees' node arrays, grown on the host."""

    def __init__(self, b: int, capacity: int, k: int, step_tokens: int, pad: int):
        self.b, self.k, self.pad = b, k, pad
        self.parent = np.full((b, capacity), -1, np.int32)
        self.depth = np.zeros((b, capacity), np.int32)
        self.children = np.full((b, capacity, k), -1, np.int32)
        self.num_children = np.zeros((b, capacity), np.int32)
        self.prior = np.zeros((b, capacity), np.float64)
        self.visits = np.zeros((b, capacity), np.int32)
        self.w = np.zeros((b, capacity), np.float64)
        self.value = np.zeros((b, capacity), np.float64)
        self.terminal = np.zeros((b, capacity), bool)
        self.finished = np.zeros((b, capacity), bool)
        self.step_tokens = np.full((b, capacity, step_tokens), pad, np.int32)
        self.step_lengths = np.zeros((b, capacity), np.int32)
        self.step_logprob = np.zeros((b, capacity), np.float64)
        self.path_lengths = np.zeros((b, capacity), np.int32)
        self.num_nodes = np.ones((b,), np.int32)

    def q(self) -> np.ndarray:
        return self.w / np.maximum(self.visits, 1)

    def select(self, b: int, c_puct: float) -> int:
        node = 0
        while self.num_children[b, node] and not self.terminal[b, node]:
            ch = self.children[b, node, :self.num_children[b, node]]
            n = self.visits[b, ch]
            score = self.w[b, ch] / n + c_puct * self.prior[b, ch] * np.sqrt(self.visits[b, node]) / (1 + n)
            node = int(ch[np.argmax(score)])
        return node

    def path(self, b: int, node: int) -> np.ndarray:
        return _path(self.step_tokens[b], self.step_lengths[b], self.parent[b], node)

    def expand(self, b: int, leaf: int, tokens, lengths, logprob, finished, values, max_steps: int,
               prior_temperature: float, dedupe: bool) -> None:
        """Adds the K candidates (rows of tokens [K, L] etc.) as children of `leaf`."""
        groups: dict[Any, list[int]] = {}
        for r in range(tokens.shape[0]):
            key = tuple(tokens[r, :lengths[r]]) if dedupe else r
            groups.setdefault(key, []).append(r)
        first = [rows[0] for rows in groups.values()]
        lp = np.asarray([logprob[r] for r in first], np.float64) / prior_temperature
        prior = np.exp(lp - lp.max())
        prior /= prior.sum()
        depth = self.depth[b, leaf] + 1
        for i, rows in enumerate(groups.values()):
            r, c = rows[0], int(self.num_nodes[b])
            self.num_nodes[b] += 1
            self.children[b, leaf, i] = c
            self.parent[b, c], self.depth[b, c], self.prior[b, c] = leaf, depth, prior[i]
            self.step_tokens[b, c], self.step_lengths[b, c] = tokens[r], lengths[r]
            self.step_logprob[b, c] = logprob[r]
            self.path_lengths[b, c] = self.path_lengths[b, leaf] + lengths[r]
            self.finished[b, c] = finished[r]
            self.terminal[b, c] = finished[r] or depth >= max_steps
            self.value[b, c] = self.w[b, c] = float(np.mean(values[rows]))
            self.visits[b, c] = 1
        self.num_children[b, leaf] = len(first)

    def backup(self, b: int, node: int, v: float) -> None:
        while node >= 0:
            self.visits[b, node] += 1
            self.w[b, node] += v
            node = int(self.parent[b, node])

    def best(self, b: int, rule: str) -> list[int]:
        q, nodes = self.q(), [0]
        while self.num_children[b, nodes[-1]]:
            ch = self.children[b, nodes[-1], :self.num_children[b, nodes[-1]]]
            keys = [(self.visits[b, c], q[b, c]) if rule == "visits" else (q[b, c], self.visits[b, c]) for c in ch]
            nodes.append(int(ch[max(range(len(ch)), key=lambda i: (keys[i], -i))]))
        return nodes


def _check(name: str, v: Any, choices: Sequence[str]) -> None:
    if v not in choices:
        raise ConfigError(f"mcts: {name}={v!r} is not one of {tuple(choices)}")


def _stop_rows(state: SearchState, stop: np.ndarray) -> SearchState:
    """Marks rows done, so `extend` writes nothing for them (a stopped problem, a finished rollout)."""
    return state.replace(done=jnp.logical_or(state.done, jnp.asarray(stop)))


def _values(value_fn: ValueFn, state: SearchState, rows: int) -> np.ndarray:
    v = np.asarray(jax.device_get(value_fn(*state.sequences())), np.float64)
    if v.shape != (rows,):
        raise ConfigError(f"mcts: value_fn returned shape {v.shape}; expected ({rows},), one value per row of "
                          "the (tokens, mask) it was given (B problems x expansions)")
    if not np.isfinite(v).all():
        raise ConfigError(f"mcts: value_fn returned non-finite values at rows {np.flatnonzero(~np.isfinite(v))[:8]}; "
                          "it must return finite floats (map a failed verification to a low score)")
    return v


def mcts(decoder: StepDecoder, params: Any, prompt_tokens, prompt_mask, key: jax.Array, value_fn: ValueFn, *,
         simulations: int, expansions: int, c_puct: float = 1.0, leaf: str = "value",
         prior_temperature: float = 1.0, rollout_decoder: StepDecoder | None = None, best: str = "visits",
         max_generated_tokens: int | None = None, dedupe: bool = True) -> MCTSResult:
    """MCTS over solution steps for B problems at once (see the module docstring).

    prompt_tokens / prompt_mask: [B, P], left-padded. value_fn(tokens, mask) -> float [B * expansions]:
    tokens / mask are jax arrays [B * expansions, P + M] (rows b * expansions .. of problem b) of prompt +
    path + candidate step (leaf="value") or of the completed candidate (leaf="rollout"); it may run on the
    device or the host (any callable returning something np.asarray reads). rollout_decoder: a decoder of
    the same model and step shape (e.g. temperature 0 for greedy rollouts); default `decoder`.
    best: "visits" or "q", how the reported path is picked. dedupe: merge identical sibling candidates.
    """
    cfg = decoder.cfg
    _check("leaf", leaf, LEAF_MODES)
    _check("best", best, BEST_RULES)
    check_count("mcts", simulations=simulations, expansions=expansions)
    if max_generated_tokens is not None:
        check_count("mcts", max_generated_tokens=max_generated_tokens)
    if not c_puct >= 0:
        raise ConfigError(f"mcts: c_puct={c_puct} must be >= 0 (0: pick children by Q alone)")
    if not prior_temperature > 0:
        raise ConfigError(f"mcts: prior_temperature={prior_temperature} must be > 0 (1: the policy's own odds)")
    rdec = decoder if rollout_decoder is None else rollout_decoder
    shape = ("step_tokens", "max_steps", "eos_token_ids", "pad_token_id")
    if any(getattr(rdec.cfg, f) != getattr(cfg, f) for f in shape):
        raise ConfigError(f"mcts: rollout_decoder's StepConfig differs from the decoder's in {shape}; build it "
                          "with the same step shape (only the sampling settings may differ)")
    prompt_tokens, prompt_mask = np.asarray(prompt_tokens), np.asarray(prompt_mask)
    if prompt_tokens.ndim != 2 or prompt_mask.shape != prompt_tokens.shape:
        raise ConfigError(f"mcts: prompt_tokens {prompt_tokens.shape} and prompt_mask {prompt_mask.shape} must "
                          "both be [B, P]")
    b, k, L, steps = prompt_tokens.shape[0], expansions, cfg.step_tokens, cfg.max_steps
    width, rows = (steps - 1) * L, b * expansions
    trees = _Trees(b, 1 + simulations * k, k, L, cfg.pad_token_id)
    leaves = np.full((b, simulations), -1, np.int32)
    backed = np.zeros((b, simulations), np.float64)
    sims = np.zeros((b,), np.int32)
    generated = np.zeros((b,), np.int64)
    budget = np.iinfo(np.int64).max if max_generated_tokens is None else max_generated_tokens
    root = decoder.start(params, prompt_tokens, prompt_mask)
    if leaf == "rollout" and width:  # room for a padded path plus a whole solution
        root = root.replace(cache=root.cache.grow(root.cache.length + width))
    repeat = jnp.asarray(np.repeat(np.arange(b), k), jnp.int32)
    for s in range(simulations):
        running = generated < budget
        if not running.any():
            break
        node = np.asarray([trees.select(i, c_puct) for i in range(b)])
        expand = running & ~trees.terminal[np.arange(b), node]
        if expand.any():
            key_s = jax.random.fold_in(key, s)
            state = root
            if width:
                path_t = np.full((b, width), cfg.pad_token_id, np.int32)
                path_m = np.zeros((b, width), np.int32)
                for i in np.flatnonzero(expand):
                    p = trees.path(i, node[i])
                    path_t[i, :len(p)], path_m[i, :len(p)] = p, 1
                state = decoder.append(params, root, path_t, path_m)
            state = decoder.select(state, repeat)
            if not expand.all():
                state = _stop_rows(state, np.repeat(~expand, k))
            state, step = decoder.extend(params, state, jax.random.fold_in(key_s, 0))
            st, finished = jax.device_get((step, state.finished))
            lengths = st.mask.sum(-1).astype(np.int32)
            generated += lengths.reshape(b, k).sum(-1)
            if leaf == "rollout":
                state = _rollout(rdec, params, state, key_s, steps - 1 - np.repeat(trees.depth[np.arange(b), node], k),
                                 np.repeat(expand, k), generated, k)
            values = _values(value_fn, state, rows)
        for i in np.flatnonzero(running):
            if expand[i]:
                r = slice(i * k, (i + 1) * k)
                trees.expand(i, node[i], st.tokens[r], lengths[r], st.logprob[r], finished[r], values[r], steps,
                             prior_temperature, dedupe)
                v = float(values[r].mean())
            else:
                v = float(trees.value[i, node[i]])
            trees.backup(i, int(node[i]), v)
            leaves[i, s], backed[i, s] = node[i], v
            sims[i] += 1
    return _result(trees, best, leaves, backed, sims, generated, prompt_tokens, prompt_mask, cfg)


def _rollout(rdec: StepDecoder, params: Any, state: SearchState, key_s: jax.Array, remaining: np.ndarray,
             live: np.ndarray, generated: np.ndarray, k: int) -> SearchState:
    """Extends every live row until it is done (EOS) or has written `remaining` more steps."""
    remaining = np.where(live, remaining, 0)
    for i in range(1, int(remaining.max(initial=0)) + 1):
        state = _stop_rows(state, remaining < i)
        if bool(jax.device_get(jnp.all(state.done))):
            break
        state, step = rdec.extend(params, state, jax.random.fold_in(key_s, i))
        generated += np.asarray(jax.device_get(step.mask)).sum(-1).reshape(-1, k).sum(-1)
    return state


def _result(trees: _Trees, rule: str, leaves, backed, sims, generated, prompt_tokens, prompt_mask, cfg) -> MCTSResult:
    b, m = trees.parent.shape[0], cfg.max_new_tokens
    tokens = np.full((b, m), cfg.pad_token_id, np.int32)
    lengths = np.zeros((b,), np.int32)
    best_nodes = np.full((b, cfg.max_steps + 1), -1, np.int32)
    q = trees.q()
    for i in range(b):
        nodes = trees.best(i, rule)
        p = trees.path(i, nodes[-1])
        tokens[i, :len(p)], lengths[i] = p, len(p)
        best_nodes[i, :len(nodes)] = nodes
    last = best_nodes[np.arange(b), (best_nodes >= 0).sum(-1) - 1]
    return MCTSResult(
        tokens=tokens, lengths=lengths, best_nodes=best_nodes, best_q=q[np.arange(b), last],
        best_terminal=trees.terminal[np.arange(b), last], parent=trees.parent, depth=trees.depth,
        children=trees.children, prior=trees.prior, visits=trees.visits, q=q, value=trees.value,
        terminal=trees.terminal, finished=trees.finished, step_tokens=trees.step_tokens,
        step_lengths=trees.step_lengths, step_logprob=trees.step_logprob, path_lengths=trees.path_lengths,
        num_nodes=trees.num_nodes, leaves=leaves, backed_up=backed, simulations=sims, generated_tokens=generated,
        prompt_tokens=prompt_tokens, prompt_mask=prompt_mask)


def _path(step_tokens, step_lengths, parent, node: int) -> np.ndarray:
    steps = []
    while node > 0:
        steps.append(step_tokens[node, :step_lengths[node]])
        node = int(parent[node])
    return np.concatenate(steps[::-1]).astype(np.int32) if steps else np.zeros((0,), np.int32)


def path_tokens(result: MCTSResult, problem: int, node: int) -> np.ndarray:
    """The tokens of the steps from the root to `node` (included) of `problem`, concatenated."""
    return _path(result.step_tokens[problem], result.step_lengths[problem], result.parent[problem], node)


def step_texts(result: MCTSResult, tokenizer) -> list[list[str]]:
    """Each problem's node step texts ([B][num_nodes]; the root's is ""), cut at an EOS."""
    out = []
    for i, n in enumerate(result.num_nodes):
        toks = result.step_tokens[i, :n]
        mask = np.arange(toks.shape[1])[None, :] < result.step_lengths[i, :n, None]
        out.append(decode_completions(tokenizer, toks, mask))
    return out


@dataclasses.dataclass(frozen=True)
class StepPair:
    """Two sibling steps after the same prefix: chosen has the higher Q.

    prefix: int32 [P'] the prompt's real tokens followed by the path to the parent; chosen / rejected: the
    two steps' tokens; chosen_q / rejected_q their Q values; problem, parent, chosen_node, rejected_node:
    where in the result they come from.
    """

    problem: int
    parent: int
    chosen_node: int
    rejected_node: int
    prefix: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    chosen_q: float
    rejected_q: float


def sibling_pairs(result: MCTSResult, min_q_gap: float, *, min_visits: int = 1) -> list[StepPair]:
    """Step-level preference pairs: every two siblings with different tokens, each visited at least
    `min_visits` times, whose Q values differ by at least `min_q_gap` (and by more than 0); ordered by
    problem, parent, chosen (by Q, highest first), rejected (by Q, highest first)."""
    if not min_q_gap >= 0:
        raise ConfigError(f"sibling_pairs: min_q_gap={min_q_gap} must be >= 0")
    check_count("sibling_pairs", min_visits=min_visits)
    pairs = []
    for i in range(result.parent.shape[0]):
        prompt = result.prompt_tokens[i][np.asarray(result.prompt_mask[i]) > 0]
        for parent in range(int(result.num_nodes[i])):
            ch = [int(c) for c in result.children[i, parent] if c >= 0 and result.visits[i, c] >= min_visits]
            ch.sort(key=lambda c: -result.q[i, c])  # stable: equal Q keeps the child order
            if len(ch) < 2:
                continue
            prefix = np.concatenate([prompt, path_tokens(result, i, parent)]).astype(np.int32)
            step = lambda c: result.step_tokens[i, c, :result.step_lengths[i, c]]  # noqa: E731
            for a, hi in enumerate(ch):
                for lo in ch[a + 1:]:
                    gap = result.q[i, hi] - result.q[i, lo]
                    if gap > 0 and gap >= min_q_gap and not np.array_equal(step(hi), step(lo)):
                        pairs.append(StepPair(problem=i, parent=parent, chosen_node=hi, rejected_node=lo,
                                              prefix=prefix, chosen=step(hi), rejected=step(lo),
                                              chosen_q=float(result.q[i, hi]), rejected_q=float(result.q[i, lo])))
    return pairs
