"""The library's layers (docs/architecture.md): a package imports only packages below it, so there are no cycles.

Every import counts, including the ones inside functions: a lazy import still ties a lower layer to a
higher one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "jaxrl_llm"

# Bottom to top. A top-level module (tokenizer.py, records.py, cli.py) is a package of its own.
LAYERS = ("errors", "host_memory", "records", "kernels", "tokenizer", "assets", "sharding", "models", "rollout",
          "algos", "tasks", "lessons", "envs", "data", "rewards", "search", "eval", "train", "cli")


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported jaxrl_llm package, line) of every import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("jaxrl_llm"):
            names = [node.module] + ([f"jaxrl_llm.{a.name}" for a in node.names] if node.module == "jaxrl_llm" else [])
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("jaxrl_llm")]
        out += [(n.split(".")[1], node.lineno) for n in names if "." in n]
    return out


def _modules():
    return sorted(p for p in ROOT.rglob("*.py"))


def test_every_package_has_a_layer():
    packages = {_package_of(p) for p in _modules()} - {"__init__"}
    assert packages <= set(LAYERS), f"packages without a layer: {sorted(packages - set(LAYERS))}; add them to LAYERS"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_go_down(path):
    pkg = _package_of(path)
    if pkg == "__init__":
        return
    level = LAYERS.index(pkg)
    upward = [f"{path.relative_to(ROOT.parent)}:{line} imports jaxrl_llm.{target} (layer {LAYERS.index(target)}) "
              f"from {pkg} (layer {level})"
              for target, line in _imports(path) if target != pkg and LAYERS.index(target) > level]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: a lazy import from sharding into train is reported."""
    global ROOT
    real, ROOT = ROOT, tmp_path / "jaxrl_llm"
    (ROOT / "sharding").mkdir(parents=True)
    bad = ROOT / "sharding" / "plan.py"
    bad.write_text("def f():\n    from jaxrl_llm.train.config import ConfigError\n")
    try:
        with pytest.raises(AssertionError, match=r"sharding/plan.py:2 imports jaxrl_llm.train"):
            test_imports_only_go_down(bad)
    finally:
        ROOT = real
