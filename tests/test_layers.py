"""The import layers of DESIGN.md, written as import-linter contracts (pyproject.toml [tool.importlinter]): the code
keeps them, and the same contracts break on a planted upward import, inside a function or not."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def lint_imports(cwd):
    """import-linter's command line on the pyproject.toml in `cwd`, in a fresh interpreter of this environment (no
    network, no cache files); the packages are those under `cwd`."""
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "COLUMNS": "400"}   # no wrapped lines
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()",
                           "--no-cache", "--no-logo"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_code_keeps_every_contract():
    assert set(CONFIG["root_packages"]) == {"benchmarks", "diffusion", "evaluation", "models", "data", "utils"}
    layers = next(c for c in CONFIG["contracts"] if c["id"] == "layers")["layers"]
    assert layers == ["benchmarks", "diffusion | evaluation", "models | data", "utils"]   # DESIGN.md's order
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    for contract in CONFIG["contracts"]:
        assert f"{contract['name']} KEPT" in result.stdout


# ------------------------------------------------------------------------------------------------------------
# The check can fail: a stand-in tree with the real packages' names, checked with the real contracts
# ------------------------------------------------------------------------------------------------------------

def fake_tree(root, plants):
    """Empty packages and evaluation/ modules named as the contracts name them, plus `plants` {path: source}."""
    root.mkdir()
    (root / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    for package in CONFIG["root_packages"]:
        (root / package).mkdir()
        (root / package / "__init__.py").write_text("")
    inside = next(c for c in CONFIG["contracts"] if c["id"] == "evaluation-inside")["layers"]
    for name in (m.strip().strip("()") for layer in inside for m in layer.split("|")):
        (root / "evaluation" / f"{name}.py").write_text("")
    for path, source in plants.items():
        (root / path).write_text(source)


def test_the_contracts_catch_upward_imports_and_circles(tmp_path):
    fake_tree(tmp_path / "clean", {"evaluation/digits.py": "from . import network\n",
                                   "utils/phema.py": "import math\n"})
    clean = lint_imports(tmp_path / "clean")
    assert clean.returncode == 0, clean.stdout + clean.stderr

    fake_tree(tmp_path / "planted", {
        "utils/phema.py": "def sweep():\n    from evaluation import evaluator  # inside a function\n",
        "diffusion/repa.py": "from evaluation.digits import x\n",
        "evaluation/digits.py": "def reference():\n    from .evaluator import build_reference\n",
    })
    broken = lint_imports(tmp_path / "planted")
    out = broken.stdout
    assert broken.returncode != 0, out
    assert "utils is not allowed to import evaluation" in out and "utils.phema -> evaluation" in out
    assert "diffusion is not allowed to import evaluation" in out                               # the layers
    assert "diffusion/ and evaluation/ know nothing of each other BROKEN" in out                # the independence
    assert "evaluation.digits -> evaluation.evaluator" in out                                   # the circle
    assert "models/ and data/ know nothing of each other KEPT" in out


@pytest.mark.slow   # a fresh interpreter, ~11 s
def test_a_dit_run_starts_without_importing_diffusers():
    """diffusers (~3 s of start-up) is imported where a U-Net, a tokenizer or DPM-Solver++ is built, never by the
    scripts' imports alone."""
    code = "import sys, train, sample; print('diffusers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False", "a module imports diffusers at the top again"
