"""Mesh construction, logical rules, sharded init, and sharded == single-device numerics."""

import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrl_llm.models import CausalLM, ModelConfig, init_fn_for
from jaxrl_llm.sharding import (DEFAULT_RULES, ShardingEnv, check_replication, logical_to_spec, make_mesh,
                                replication_report, resolve_axis_sizes, set_cpu_devices)
from jaxrl_llm.sharding.params import init_sharded, param_shardings

CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, qkv_bias=True)

MESHES = {
    "single": {"data": 1},
    "data8": {"data": 8},
    "fsdp8": {"data": 1, "fsdp": 8},
    "fsdp4_tensor2": {"data": 1, "fsdp": 4, "tensor": 2},
}


def _env(axes):
    n = int(np.prod(list(axes.values())))
    return ShardingEnv(make_mesh(axes, devices=jax.devices()[:n]))


def test_axis_sizes_auto_and_errors():
    assert resolve_axis_sizes({"data": -1, "fsdp": 2, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert resolve_axis_sizes({"data": 8}, 8) == {"data": 8}
    with pytest.raises(ValueError, match=r"fixed sizes multiply to 3, which does not divide the 8"):
        resolve_axis_sizes({"data": -1, "tensor": 3}, 8)
    with pytest.raises(ValueError, match=r"multiply to 4 but there are 8 devices"):
        resolve_axis_sizes({"data": 2, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match=r"at most one axis may be -1"):
        resolve_axis_sizes({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match=r"mesh.axes.tensor=0"):
        resolve_axis_sizes({"data": -1, "tensor": 0}, 8)


def test_set_cpu_devices_checks_and_splits_the_cpu():
    for bad in (0, -2, True, "2", 1.5):
        with pytest.raises(ValueError, match="integer >= 1"):
            set_cpu_devices(bad)
    jax.devices()  # this process's backends are up (conftest: 8 host devices): too late, and said so
    with pytest.raises(RuntimeError, match="--cpu-devices 2"):
        set_cpu_devices(2)
    # What `jaxrl-llm train --cpu-devices 3` does first thing; the default mesh then has data=3.
    code = ("from jaxrl_llm import cli; "
            "ns = cli.build_parser().parse_args(['train', 'x.py', '--cpu-devices', '3', '--distributed', 'off']); "
            "cli.start_distributed(ns); import jax; from jaxrl_llm.sharding import make_mesh; "
            "print(jax.device_count(), dict(make_mesh().shape))")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "3 {'data': 3, 'fsdp': 1, 'tensor': 1}"


def test_make_mesh_default_uses_all_devices(devices):
    mesh = make_mesh()
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}


def test_logical_to_spec_conflicts_divisibility_and_unknown_names():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    # activations: batch takes data+fsdp, embed cannot reuse fsdp
    assert logical_to_spec(("batch", "length", "embed"), DEFAULT_RULES, mesh, (8, 4, 64)) == P(("data", "fsdp"))
    # parameters: embed over fsdp, heads over tensor
    assert logical_to_spec(("layers", "embed", "heads", "head_dim"), DEFAULT_RULES, mesh,
                           (2, 64, 4, 16)) == P(None, "fsdp", "tensor")
    # a dimension the axis does not divide stays unsharded on that axis
    assert logical_to_spec(("embed", "kv_heads"), DEFAULT_RULES, mesh, (64, 3)) == P("fsdp")
    # batch of 2 only divides data=2, fsdp is dropped
    assert logical_to_spec(("batch",), DEFAULT_RULES, mesh, (2,)) == P("data")
    with pytest.raises(KeyError, match=r"logical axis 'experts' has no sharding rule"):
        logical_to_spec(("experts",), DEFAULT_RULES, mesh)
    # standard axes missing from a mesh count as size 1
    assert logical_to_spec(("embed", "heads"), DEFAULT_RULES, make_mesh({"fsdp": 8}), (64, 8)) == P("fsdp")
    with pytest.raises(KeyError, match=r"names mesh axis 'model', which is neither in the mesh"):
        ShardingEnv(mesh, (("embed", "model"),))


def test_params_created_sharded_and_replication_check():
    env = _env(MESHES["fsdp4_tensor2"])
    params, shardings = init_sharded(init_fn_for(CausalLM(CFG)), jax.random.key(0), env)
    q = params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.shape == (2, 64, 4, 16)
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 16, 2, 16)
    emb = params["model"]["embed_tokens"]["embedding"]
    assert emb.sharding.spec == P("tensor", "fsdp")
    shapes, _ = param_shardings(init_fn_for(CausalLM(CFG)), env)
    assert replication_report(shapes, shardings).fraction == 0.0

    fsdp_env = _env(MESHES["fsdp8"])
    shapes, shardings = param_shardings(init_fn_for(CausalLM(CFG)), fsdp_env)
    report = replication_report(shapes, shardings)
    assert 0 < report.fraction < 0.01  # only the q/k/v biases [L, heads, D] have no fsdp-sharded axis
    assert "bias" in report.largest[0][0]
    check_replication(report, max_fraction=0.05)

    data_env = _env(MESHES["data8"])
    shapes, shardings = param_shardings(init_fn_for(CausalLM(CFG)), data_env)
    report = replication_report(shapes, shardings)
    assert report.fraction == 1.0
    assert "embed_tokens" in str(report)
    with pytest.raises(ValueError, match=r"100.0% of parameter bytes are fully replicated.*max_replicated_fraction=0.5"):
        check_replication(report, max_fraction=0.5)


def _loss_and_grads(env, tokens, mask):
    module = CausalLM(CFG)
    params, shardings = init_sharded(init_fn_for(module), jax.random.key(0), env)
    bs = env.sharding(("batch", "length"), tokens.shape)
    tokens, mask = jax.device_put(tokens, bs), jax.device_put(mask, bs)

    def loss_fn(p, toks, m):
        with env.activate():
            logits, _ = module.apply({"params": p}, toks, None, m)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, toks[:, 1:, None], -1)[..., 0]
        w = (m[:, 1:] & m[:, :-1]).astype(jnp.float32)
        return jnp.sum(nll * w) / jnp.sum(w), logits

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), in_shardings=(shardings, bs, bs))
    (loss, logits), grads = step(params, tokens, mask)
    return jax.device_get((params, loss, logits, grads))


def test_logits_and_grads_equal_across_meshes():
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, CFG.vocab_size, size=(8, 12)).astype(np.int32)
    lengths = rng.integers(3, 13, size=8)
    mask = np.arange(12)[None, :] >= (12 - lengths)[:, None]  # left padding
    tokens = np.where(mask, tokens, 0)
    ref_params, ref_loss, ref_logits, ref_grads = _loss_and_grads(_env(MESHES["single"]), tokens, mask)
    assert np.isfinite(ref_loss) and ref_loss > 0
    gnorm = sum(float(np.sum(np.square(g))) for g in jax.tree.leaves(ref_grads))
    assert gnorm > 0
    for name in ("data8", "fsdp8", "fsdp4_tensor2"):
        params, loss, logits, grads = _loss_and_grads(_env(MESHES[name]), tokens, mask)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, ref_params)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(logits[mask], ref_logits[mask], atol=2e-5, err_msg=name)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4, err_msg=name),
                     grads, ref_grads)


def test_model_code_names_no_mesh_axes():
    root = pathlib.Path(__file__).resolve().parents[1] / "jaxrl_llm" / "models"
    pattern = re.compile(r"""["'](data|fsdp|tensor)["']""")
    offenders = [f"{p.name}:{i + 1}" for p in root.glob("*.py")
                 for i, line in enumerate(p.read_text().splitlines()) if pattern.search(line)]
    assert not offenders, f"mesh axis names in model code: {offenders}"
