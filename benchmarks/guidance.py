"""Guidance side by side on one digits run: none, classifier-free, CFG on an interval, autoguidance by an earlier
checkpoint and by a smaller model; samples/s and the digits judge of benchmarks/digits_quality.py for each.

    python benchmarks/guidance.py --run runs/modern/baseline                # trains the DiT-Mini/4 guide if missing
    python benchmarks/guidance.py --run RUN --configs cfg2:cfg_scale=2 auto2:guidance=auto,cfg_scale=2,guide_ckpt=G

Every config samples the same 1000 digits (100 per class, the same starting noise) from the run's final EMA with
sample.py and the given overrides (comma-separated); `{early}` and `{small}` in an override stand for the run's
checkpoint at --early-step and the final checkpoint of the small guide (DiT-Mini/4 trained with the digits default's
recipe into --small-run; --small-overrides for another).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from digits_quality import judge, parse_config  # noqa: E402

DEFAULT_CONFIGS = (
    "none:cfg_scale=1",
    "cfg-1.5:cfg_scale=1.5",
    "cfg-1.5-interval:cfg_scale=1.5,guidance_low=0.3",
    "auto-2-early:guidance=auto,cfg_scale=2,guide_ckpt={early}",
    "auto-2-small:guidance=auto,cfg_scale=2,guide_ckpt={small}",
)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a digits run folder (its newest checkpoint is the main model)")
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--early-step", type=int, default=1000)
    parser.add_argument("--small-run", default=None, help="default: <run>-guide-mini4")
    parser.add_argument("--small-overrides", nargs="*", default=[], help="train.py overrides for the small guide "
                        "(default: the digits default's recipe; give the run's own if it differs)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=25, help="the Heun ODE's steps (the digits default)")
    args = parser.parse_args()
    run = Path(args.run).resolve()
    small = Path(args.small_run or f"{run}-guide-mini4").resolve()
    if not (small / "checkpoints").is_dir():  # the digits default's recipe with a 4x4 patch
        subprocess.run([sys.executable, "train.py", "logger=none", "model=DiT-Mini-4", f"run_dir={small}",
                        "fid.at_end=false", *args.small_overrides], cwd=ROOT, check=True)
    early = run / "checkpoints" / f"{args.early_step:07d}.pt"
    results = []
    for name, overrides in map(parse_config, args.configs):
        overrides = [o.format(early=early, small=small) for o in overrides]
        out = run / "samples" / f"guidance-{name}"
        start = time.perf_counter()
        subprocess.run([sys.executable, "sample.py", f"ckpt={run}", f"num_samples={args.num_samples}", f"out={out}",
                        "batch_size=500", f"steps={args.steps}", *overrides], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        data = np.load(out / "samples.npz")
        results.append({"config": name, "overrides": overrides, "seconds": seconds,
                        "samples_per_s": args.num_samples / seconds, **judge(data["arr_0"], data["arr_1"])})
    print(f"\n{'config':18s} {'samples/s':>9s} {'judged':>7s} {'Frechet':>8s} {'FD-digits':>9s} {'net acc.':>8s}")
    for r in results:
        print(f"{r['config']:18s} {r['samples_per_s']:9.1f} {100 * r['class_match']:6.1f}% {r['frechet_pixels']:8.2f} "
              f"{r['fd_digits']:9.3f} {100 * r['class_accuracy_digits_net']:7.1f}%")
    r = results[0]
    print(f"{'real held-out':18s} {'':9s} {100 * r['class_match_real_heldout']:6.1f}% "
          f"{r['frechet_pixels_real_heldout']:8.2f} {r['fd_digits_real_heldout']:9.3f} "
          f"{100 * r['class_accuracy_digits_net_real_heldout']:7.1f}%")
    (run / "guidance.json").write_text(json.dumps(results, indent=1))
    print(f"results: {run / 'guidance.json'} (seconds include sample.py's start-up)")


if __name__ == "__main__":
    main()
