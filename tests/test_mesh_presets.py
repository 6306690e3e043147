"""Mesh presets: consistent shapes, clear errors, and build() using them (and the memory check) before init."""

import math

import pytest

from jaxrl_llm.train.memory import MemoryBudgetError
from jaxrl_llm.sharding.mesh import DEFAULT_AXES
from jaxrl_llm.sharding.presets import MESH_PRESETS, get_mesh_preset, mesh_axes_for
from jaxrl_llm.train.config import base_config, load_experiment


def _mesh(preset="", **axes):
    return {"preset": preset, "axes": {**DEFAULT_AXES, **axes}}


@pytest.mark.parametrize("name", sorted(MESH_PRESETS))
def test_every_preset_multiplies_to_its_devices(name):
    p = MESH_PRESETS[name]
    assert math.prod(p.axes_dict.values()) == p.num_devices
    assert list(p.axes_dict) == ["data", "fsdp", "tensor"]
    assert p.num_devices % p.num_hosts == 0 and p.rationale
    assert mesh_axes_for(_mesh(name), p.num_devices) == p.axes_dict


def test_known_topologies():
    assert get_mesh_preset("2x8xH100").axes_dict == {"data": 2, "fsdp": 8, "tensor": 1}
    assert get_mesh_preset("v5litepod-8") is MESH_PRESETS["v5e-8"]
    assert (MESH_PRESETS["v5p-64"].num_devices, MESH_PRESETS["v5p-64"].num_hosts) == (32, 8)  # one device per chip
    assert {n: p.device_memory_gib for n, p in MESH_PRESETS.items() if n != "cpu-8"} == {
        "v4-8": 32.0, "v5e-8": 16.0, "v5p-64": 95.0, "v6e-8": 32.0, "8xh100": 80.0, "2x8xh100": 80.0}


def test_no_preset_gives_the_axes():
    assert mesh_axes_for(_mesh(data=2, fsdp=-1), 8) == {"data": 2, "fsdp": -1, "tensor": 1}
    assert mesh_axes_for(base_config().mesh, 8) == DEFAULT_AXES


def test_unknown_preset_names_the_nearest():
    with pytest.raises(ValueError, match=r"unknown mesh.preset '8xh10'; did you mean '8xh100'\?"):
        mesh_axes_for(_mesh("8xh10"), 8)
    with pytest.raises(ValueError, match=r"did you mean 'v5e-8'\?.*presets: v4-8, v5e-8"):
        get_mesh_preset("v5e8")


def test_device_count_mismatch():
    with pytest.raises(ValueError, match=r"mesh.preset='8xh100' is for 8 devices but 16 are present.*2x8xh100 \(16\)"):
        mesh_axes_for(_mesh("8xh100"), 16)


def test_preset_with_other_axes_is_an_error():
    with pytest.raises(ValueError, match=r"mesh.preset='cpu-8' and mesh.axes=.*are both given; give one or the other"):
        mesh_axes_for(_mesh("cpu-8", data=2, fsdp=4), 8)


def test_build_uses_the_preset_and_checks_memory_first(devices, monkeypatch):
    from jaxrl_llm.train import build as build_mod
    meshes, created = [], []
    real_make_mesh = build_mod.make_mesh
    monkeypatch.setattr(build_mod, "make_mesh", lambda axes: meshes.append(real_make_mesh(axes)) or meshes[-1])
    monkeypatch.setattr(build_mod, "create_model", lambda *a, **k: created.append(1))
    tight = load_experiment("experiments/grpo.py:smoke", ["mesh.preset=cpu-8", "mesh.device_memory_gb=0.001"])
    with pytest.raises(MemoryBudgetError, match=r"per device \(stage 'sft'.*MiB.*mesh data=2, fsdp=4, tensor=1"):
        build_mod.build(tight)
    assert [dict(m.shape) for m in meshes] == [{"data": 2, "fsdp": 4, "tensor": 1}]
    assert not created  # refused before any parameter was created
