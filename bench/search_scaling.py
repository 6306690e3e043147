"""Test-time compute scaling on held-out chain-arithmetic problems: accuracy against generated tokens for greedy,
best-of-N (majority, ORM, PRM, PRM-weighted vote), PRM-guided beam search, DVTS and MCTS.

    .venv/bin/python bench/search_scaling.py                            # trains experiments/search_chain.py first
    .venv/bin/python bench/search_scaling.py --budgets 4,16,64 --problems 256 --plot docs/img/search_scaling.png
    .venv/bin/python bench/search_scaling.py --experiment experiments/search_chain.py:smoke --problems 8 --budgets 4
    .venv/bin/python bench/search_scaling.py --experiment experiments/smollm2_chain_search.py --prm oracle \
        --orm none --methods majority,prm,beam,mcts --problems 32 --step-tokens 12 --max-steps 4   # a real model

The run (the policy stage `--policy`, the PRM and the ORM stages) is trained by the experiment unless it has
finished already (the trainer skips finished stages). `--prm oracle` ranks steps by the task's true step grades
instead of a learned PRM (the bound a PRM approaches; a real model with no PRM trained for it). Budgets are in candidate solutions per problem (see
`eval.search_eval`); every row reports the tokens actually generated per problem. Writes
<run_dir>/search_scaling.json and, with --plot, the curve.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
import types

from rl_iteration import cpu_model  # bench/, the script's own directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experiment", default="experiments/search_chain.py")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="experiment overrides")
    ap.add_argument("--budgets", default="4,16")
    ap.add_argument("--methods", default="majority,orm,prm,prm_vote,beam,dvts,mcts")
    ap.add_argument("--problems", type=int, default=128)
    ap.add_argument("--split", default="test")
    ap.add_argument("--expansions", type=int, default=4)
    ap.add_argument("--step-tokens", type=int, default=8)
    ap.add_argument("--max-steps", type=int, default=5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", default="sft", help="the stage whose policy searches")
    ap.add_argument("--prm", default="prm", help="a prm stage's name, 'oracle' (the task's step grades) or 'none'")
    ap.add_argument("--orm", default="orm", help="a reward_model stage's name or 'none'")
    ap.add_argument("--plot", default="")
    args = ap.parse_args()

    import jax

    from jaxrl_llm.algos.prm import step_end_table
    from jaxrl_llm.eval.search_eval import SearchEvalConfig, evaluate_search, plot_search, search_table
    from jaxrl_llm.search.decoding import StepConfig
    from jaxrl_llm.tokenizer import tokenizer_info
    from jaxrl_llm.train.build import build
    from jaxrl_llm.train.config import load_experiment
    from jaxrl_llm.models import process_reward_model, reward_model
    from jaxrl_llm.train.stages.preference import load_reward_params
    from jaxrl_llm.train.stages.prm import load_prm_params
    from jaxrl_llm.train.trainer import load_stage_policy, train

    cfg = load_experiment(args.experiment, args.set)
    t0 = time.time()
    train(cfg)
    train_s = time.time() - t0
    run_dir = pathlib.Path(cfg.run_root) / cfg.name
    comp, params = build(cfg)
    stages = tuple(cfg.stages)
    policy, _, _ = load_stage_policy(comp, cfg, run_dir, args.policy, params)
    run = types.SimpleNamespace(checkpoint_dir=lambda name: run_dir / "checkpoints" / name)  # read only
    prm = orm = None
    if args.prm == "oracle":
        prm = "oracle"
    elif args.prm != "none":
        prm = (process_reward_model(comp.model_cfg), load_prm_params(comp, run, args.prm, stages, policy))
    if args.orm != "none":
        orm = (reward_model(comp.model_cfg), load_reward_params(comp, run, args.orm, stages, policy))
    task, tok = comp.task, comp.tokenizer
    table = step_end_table(tok, task.step_separator, comp.model_cfg.vocab_size)
    eos = tuple(tokenizer_info(tok).eos_ids)
    sc = StepConfig(step_tokens=args.step_tokens, max_steps=args.max_steps, temperature=args.temperature,
                    eos_token_ids=eos, pad_token_id=tokenizer_info(tok).pad_id)
    ecfg = SearchEvalConfig(budgets=tuple(int(k) for k in args.budgets.split(",")),
                            methods=tuple(args.methods.split(",")), expansions=args.expansions, step=sc,
                            batch_size=args.batch_size, max_prompt_len=int(cfg[args.policy].max_prompt_len))
    examples = task.examples(args.split, args.problems, int(cfg.seed))
    t1 = time.time()
    rows = evaluate_search((comp.module, comp.model_cfg, policy), tok, task, examples, ecfg, step_ends=table,
                           prm=prm, orm=orm, env=comp.env, param_shardings=comp.shardings, chat=comp.chat,
                           seed=args.seed)
    search_s = time.time() - t1
    print(f"{cfg.name}: {len(examples)} held-out problems ({args.split}), {jax.devices()[0].device_kind} "
          f"({cpu_model()}); training {train_s:.0f} s (0 when the run had finished), search {search_s:.0f} s\n")
    print(search_table(rows))
    out = {"experiment": args.experiment, "args": vars(args), "cpu": cpu_model(), "rows": rows, "search_s": search_s}
    (run_dir / "search_scaling.json").write_text(json.dumps(out, indent=1) + "\n")
    if args.plot:
        plot_search(rows, args.plot, title=f"{cfg.name}: held-out accuracy vs generated tokens")
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
