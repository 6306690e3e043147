"""kernels.platform (the CPU's features from /proc/cpuinfo) and the dense layers' two backwards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.kernels import dense, platform

INTEL_SPR = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: something else
flags\t\t: fpu
"""

ZEN3 = """processor : 0
vendor_id : AuthenticAMD
cpu family : 25
model : 1
model name : AMD EPYC 7B13
flags : fpu sse avx avx2 fma
"""


def test_parse_cpuinfo_reads_the_first_processor():
    info = platform.parse_cpuinfo(INTEL_SPR)
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert (info["vendor"], info["family"], info["cpu_model"]) == ("GenuineIntel", "6", "143")
    assert all(info["features"].values())  # the second block's poorer flags are not read
    zen3 = platform.parse_cpuinfo(ZEN3)
    assert zen3["features"] == {"avx2": True, "fma": True, "avx512f": False, "avx512_vnni": False,
                                "avx512_bf16": False, "amx_tile": False, "amx_bf16": False}


def test_summary_names_model_and_missing_features(tmp_path):
    line = platform.summary(platform.parse_cpuinfo(ZEN3))
    assert line.startswith("AMD EPYC 7B13 (AuthenticAMD family 25 model 1): has avx2 fma;")
    assert "lacks avx512f" in line and "avx512_bf16" in line
    missing = platform.cpu_info(str(tmp_path / "no-cpuinfo"))
    assert not any(missing["features"].values())
    assert "none of" in platform.summary(dict(missing, model="x"))


def test_features_of_ignores_unknown_flags():
    assert platform.features_of(["avx512_bf16", "sse"]) == dict.fromkeys(platform.FEATURES, False) | {
        "avx512_bf16": True}


@pytest.mark.parametrize("op_dtype", [None, jnp.bfloat16])
def test_dense_backwards_agree(op_dtype):
    """The hand-written backward and XLA's autodiff give the same forward and gradients."""
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (6, 5, 24), jnp.float32)
    w = jax.random.normal(kw, (24, 40), jnp.float32) / 5
    g = jax.random.normal(kg, (6, 5, 40), jnp.float32)

    def loss(backward):
        dot = dense.dot_general(op_dtype, backward=backward)
        return lambda x, w: jnp.sum(dot(x, w, (((2,), (0,)), ((), ()))) * g)

    (vc, gc), (vx, gx) = (jax.value_and_grad(loss(b), argnums=(0, 1))(x, w) for b in ("custom", "xla"))
    tol = 1e-5 if op_dtype is None else 2e-2
    np.testing.assert_allclose(vc, vx, rtol=tol)
    for a, b in zip(gc, gx):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(jnp.abs(b).max()))
    ref = jax.grad(lambda w: jnp.sum(jnp.einsum("bte,eo->bto", x, w) * g))(w)
    np.testing.assert_allclose(gx[1], ref, rtol=tol, atol=tol * float(jnp.abs(ref).max()))


def test_dense_unknown_backward_is_one_clear_error():
    with pytest.raises(ValueError, match="dense backward='fast'.*custom"):
        dense.dot_general(None, backward="fast")


def test_cpu_choices_pairs_each_variant_with_the_default_of_its_round():
    """bench/cpu_choices.py's summary: per-round default / variant ratios, medians over rounds, failed runs out."""
    import importlib.util
    import pathlib
    spec = importlib.util.spec_from_file_location(
        "cpu_choices", pathlib.Path(__file__).resolve().parent.parent / "bench" / "cpu_choices.py")
    cc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cc)

    def run(total, decode):
        return {"ok": True, "generation": 0.2, "reference": 0.1, "update": total - 0.3, "total": total,
                "decode": decode, "cpu_total": 2 * total, "cpu_ref_update": total, "cpu_decode": decode}

    runs = {"default": [run(1.0, 0.2), run(2.0, 0.4), run(1.0, 0.2)],
            "unroll": [run(0.5, 0.2), run(2.0, 0.2), {"ok": False, "error": "exit 1"}]}
    s = cc.summarise(runs)
    assert s["default"]["total_speedup"] == 1.0
    assert s["unroll"]["rounds_ok"] == 2
    assert s["unroll"]["total_speedup"] == 1.5 and s["unroll"]["total_speedup_range"] == [1.0, 2.0]
    assert s["unroll"]["decode_speedup_range"] == [1.0, 2.0]
    assert s["unroll"]["total"] == 1.25  # median of the two runs that finished
    md = cc.table(s, "AMD EPYC: has avx2", "meta")
    assert md.splitlines()[0] == "CPU: AMD EPYC: has avx2"
    assert "| unroll | (b) layers unrolled" in md and "1.50 (1.00-2.00)" in md


def test_model_dense_backward_reaches_the_layers():
    """model.dense_backward picks the dense layers' backward: the custom VJP appears in the jaxpr only with
    "custom", and both give the same loss and gradients; a bad value is one error naming the key."""
    from jaxrl_llm.models import CausalLM, ModelConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, 64)
    params = CausalLM(cfg).init(jax.random.key(0), tokens)["params"]

    def loss_of(c):
        return lambda p: jnp.mean(CausalLM(c).apply({"params": p}, tokens)[0] ** 2)

    grads, jaxprs = {}, {}
    for b in ("custom", "xla"):
        f = jax.value_and_grad(loss_of(cfg.replace(dense_backward=b)))
        jaxprs[b] = str(jax.make_jaxpr(f)(params))
        grads[b] = f(params)
    assert "custom_vjp_call" in jaxprs["custom"] and "custom_vjp_call" not in jaxprs["xla"]
    np.testing.assert_allclose(grads["custom"][0], grads["xla"][0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads["custom"][1]), jax.tree.leaves(grads["xla"][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"dense_backward='fast'; expected one of \('custom', 'xla'\)"):
        ModelConfig(dense_backward="fast")
