"""The LM head's log-probs at a real shape, alone: where the update's head time goes, and what a variant buys.

    .venv/bin/python bench/head_logprobs.py       # SmolLM2-135M shape: 32 x 64 positions, 576 -> 49152
    .venv/bin/python bench/head_logprobs.py --rows 64 --positions 64 --embed 256 --vocab 512 --repeats 10

Times, interleaved over --rounds (each figure the median of the rounds' best-of---repeats), on random
hidden states [rows, positions, embed], a tied [embed, vocab] matrix and random targets:

    matmul              the [rows * positions, embed] x [embed, vocab] product alone (the floor of one head pass)
    forward             `algos.logprobs.logprobs_from_hidden` (log-probs and entropy), as the reference forward
    forward+backward    its gradient to the hidden states and the matrix (the update's head), for each variant:
                        library   the library as it is (one chunk: no rematerialisation; the block's
                                  hand-written backward, `logprobs._head_block`)
                        autodiff  the same forward differentiated by JAX (the library before 2026-12-07)
                        remat     that autodiff body under `jax.checkpoint` (the library before, for one chunk)
                        no-entropy  with_entropy=False
                        chunk C   --chunks: positions per block (several blocks: rematerialised)

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from jaxrl_llm.algos.logprobs import logprobs_from_hidden


def _autodiff_body(h, w, y, remat):
    """logprobs_from_hidden's block as one chunk differentiated by JAX, rematerialised or not (what the library
    ran before its hand-written backward)."""
    def one(hh, yy):
        logits = jnp.einsum("bce,ev->bcv", hh, w, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.sum(jnp.where(jnp.arange(logits.shape[-1]) == yy[..., None], logits, 0.0), axis=-1)
        probs = jnp.exp(logits - lse[..., None])
        return picked - lse, lse - jnp.sum(probs * logits, axis=-1)
    return (jax.checkpoint(one) if remat else one)(h, y)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--positions", type=int, default=64)
    ap.add_argument("--embed", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--chunks", default="16", help="comma-separated chunk sizes to add as variants ('' for none)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    b, n, e, v = args.rows, args.positions, args.embed, args.vocab
    h = 0.1 * jax.random.normal(jax.random.key(0), (b, n, e), jnp.float32)
    w = 0.05 * jax.random.normal(jax.random.key(1), (e, v), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (b, n), 0, v)

    def lib(chunk, ent=True):
        def loss(w_, h_):
            lp, en = logprobs_from_hidden(h_, w_, y, chunk=chunk, with_entropy=ent)
            return jnp.sum(lp), en
        return loss

    def autodiff(remat):
        def loss(w_, h_):
            lp, en = _autodiff_body(h_, w_, y, remat)
            return jnp.sum(lp), en
        return loss

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))  # noqa: E731
    fns = {"matmul": jax.jit(lambda w_, h_: h_.reshape(-1, e) @ w_),
           "forward": jax.jit(lib(n)),
           "fwd_bwd library": grad(lib(n)),
           "fwd_bwd autodiff": grad(autodiff(False)),
           "fwd_bwd remat": grad(autodiff(True)),
           "fwd_bwd no-entropy": grad(lib(n, ent=False))}
    for c in (int(x) for x in args.chunks.split(",") if x):
        fns[f"fwd_bwd chunk {c}"] = grad(lib(c))
    ref = jax.block_until_ready(fns["fwd_bwd library"](w, h))
    for name, f in fns.items():  # compile, and the gradients agree
        out = jax.block_until_ready(f(w, h))
        if name.startswith("fwd_bwd"):
            diff = max(float(jnp.max(jnp.abs(a - r))) for a, r in zip(out[1], ref[1]))
            assert diff < 1e-3, f"{name}: gradient differs from the library's by {diff}"
    best: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.rounds):
        for name, f in fns.items():
            ts = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(f(w, h))
                ts.append(time.perf_counter() - t0)
            best[name].append(min(ts))
    gflop = 2 * b * n * e * v / 1e9
    print(json.dumps({"shape": {"rows": b, "positions": n, "embed": e, "vocab": v}, "matmul_gflop": gflop,
                      "median_s": {k: statistics.median(x) for k, x in best.items()}, "rounds_s": best,
                      "device": jax.devices()[0].device_kind, "jax": jax.__version__}))


if __name__ == "__main__":
    main()
