"""Layers import only downward: errors < data, model < optim, quant, eval < config < train < submit
< cli. An import inside a function counts (it is the usual way to hide a cycle); a component's
``config.py`` is a leaf that any layer may import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pgolf"
RANK = {"errors": 0, "data": 1, "model": 1, "optim": 2, "quant": 2, "eval": 2,
        "config": 3, "train": 4, "submit": 5, "cli": 6, "__main__": 7, "__init__": 7}


def upward_imports(package: Path) -> list[str]:
    bad = []
    for f in sorted(package.rglob("*.py")):
        rel = f.relative_to(package)
        part = rel.parts[0].removesuffix(".py")
        if part not in RANK:
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from pgolf.train import loop`` names the module loop; ``from pgolf.train.loop import X`` names loop
                names = [f"{node.module}.{a.name}" for a in node.names] if node.module.count(".") == 1 else [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                bits = name.split(".")
                if bits[0] != package.name or len(bits) < 2 or (len(bits) >= 3 and bits[2] == "config"):
                    continue
                if bits[1] in RANK and RANK[bits[1]] > RANK[part]:
                    bad.append(f"{package.name}/{rel}:{node.lineno} imports {'.'.join(bits[:3])} ({part} -> {bits[1]})")
    return sorted(set(bad))


def test_no_layer_imports_a_higher_one():
    assert upward_imports(PACKAGE) == []


def test_the_check_sees_an_upward_import_inside_a_function(tmp_path):
    pkg = tmp_path / "pgolf"
    (pkg / "quant").mkdir(parents=True)
    (pkg / "train").mkdir()
    (pkg / "quant" / "x.py").write_text("def f():\n    from pgolf.train import loop\n    from pgolf.train.config import TrainConfig\n")
    (pkg / "train" / "loop.py").write_text("from pgolf.quant import x\n")
    assert upward_imports(pkg) == ["pgolf/quant/x.py:2 imports pgolf.train.loop (quant -> train)"]


@pytest.mark.parametrize("module", ["pgolf.train.run", "pgolf.train.loop", "pgolf.train.codesize"])
def test_the_training_loop_loads_no_submission_tooling(module):
    """The training loop, the artifact round trip and the code-size estimate work without
    importing ``pgolf.submit``, in a fresh interpreter."""
    import subprocess
    import sys

    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith(('pgolf.submit', 'pgolf.cli'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent)
    assert out.stdout.strip() == "[]"
