"""The scripts that decide what runs where: benchmarks/gpu_check.sh runs whole on the CPU (--cpu-dry-run), so a typo
costs no GPU minutes, and its stage limits fit one 600-s device run; .ci/run keeps every test that starts several
processes (marker `distributed`) in every run, so each such test must carry the marker."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_the_gpu_check_fits_one_device_run_and_spends_it_on_the_gpu():
    text = SCRIPT.read_text()
    stages = re.findall(r"^stage (\d+) +\"([^\"]+)\" +(.*)$", text, re.M)
    assert len(stages) == 11 and sum(int(limit) for limit, _, _ in stages) <= 480  # of 600 s: the rest is set-up
    tests = [command for _, _, command in stages if "pytest" in command]           # CPU-only tests run in CI
    assert len(tests) == 1 and "-m gpu tests/test_gpu.py" in tests[0]
    commands = " ".join(command for _, _, command in stages)
    for script in ("benchmarks.mup_coordcheck", "gpu_stages.py isoflop", "latent_cache.py --codecs",
                   "onestep_cost.py --objectives flow meanflow imf"):   # issues 29-31's measurements
        assert script in commands, script
    header = text[:text.index("set -uo pipefail")]
    listed = [int(n) for n in re.findall(r"^# +(\d+)  \S", header, re.M)]     # the header's stage list and limits
    assert listed == [int(limit) for limit, _, _ in stages], listed


@pytest.mark.slow
def test_the_gpu_check_runs_whole_on_the_cpu(tmp_path):
    """Every stage, with tiny sizes on device=cpu, ends with rc 0; the stages print what they measure."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    result = subprocess.run(["bash", str(SCRIPT), "--cpu-dry-run"], cwd=ROOT, capture_output=True, text=True,
                            env=env, timeout=1800)
    out = result.stdout
    rcs = re.findall(r"^== rc (\d+) in \d+s$", out, re.M)
    assert len(rcs) == 11 and set(rcs) == {"0"} and result.returncode == 0, out[-8000:] + result.stderr[-2000:]
    assert out.count("all checks passed") == 4, out                         # train, sample, parallel, isoflop
    assert len(re.findall(r"activation checkpointing (on|off): step [\d.]+ s", out)) == 6, out   # 3 recipes x 2
    assert re.search(r"torch\.compile \(aot_eager\): [1-9]\d* graph\(s\)", out), out
    assert re.search(r"^verdict dit \(widths 32, 64\): μP holds", out, re.M), out
    assert (tmp_path / "mup_coordcheck.png").exists()                                # the plot lands in $OUT
    assert re.search(r"achieved: [\d.]+ TFLOP/s in the DiT paper's unit", out) and "final eval_loss" in out, out
    assert len(re.findall(r"^    (fp32|tf32|bf16): encode +[\d.]+ images/s .*; decode +[\d.]+ images/s", out, re.M)) == 6
    assert re.search(r"^  imf +[\d.]+ ms/step +\([\d.]+x flow\)", out, re.M), out
    assert "stage limits: 480 s" in out and "0 stage(s) failed" in (tmp_path / "gpu-check.log").read_text()


# ------------------------------------------------------------------------------------------------------------
# Multi-process tests carry the `distributed` marker
# ------------------------------------------------------------------------------------------------------------

SEVERAL = re.compile(r"--nproc_per_node=([2-9]|\d\d)|\bstart_processes\(|\bspawn\(")


def starts_several_processes(node, constants):
    """Whether a test's source launches torchrun with 2+ processes or torch.multiprocessing, directly or through a
    module-level constant (e.g. TORCHRUN = [..., "--nproc_per_node=2"])."""
    names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    return bool(SEVERAL.search(ast.unparse(node))) or any(SEVERAL.search(constants[name]) for name in names & constants.keys())


def test_every_test_that_starts_several_processes_is_marked_distributed():
    unmarked = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        if path.name == "test_gpu.py":   # CUDA only; skipped where CI runs
            continue
        tree = ast.parse(path.read_text())
        constants = {target.id: ast.unparse(node.value) for node in tree.body if isinstance(node, ast.Assign)
                     for target in node.targets if isinstance(target, ast.Name)}
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and \
                    starts_several_processes(node, constants) and \
                    not any("mark.distributed" in ast.unparse(d) for d in node.decorator_list):
                unmarked.append(f"{path.name}::{node.name}")
    assert not unmarked, f"add @pytest.mark.distributed (.ci/run keeps these in every run): {unmarked}"
