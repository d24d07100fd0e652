"""Judge digits runs side by side: does each sample look like the digit it was conditioned on, and how soon?

    python benchmarks/digits_quality.py                                   # DDPM vs flow, each with its sampler
    python benchmarks/digits_quality.py --configs flow:diffusion=flow flow-uniform:diffusion=flow,diffusion.time_sampling=uniform
    python benchmarks/digits_quality.py --configs default: --budgets      # just the default, no time-to-quality
    python benchmarks/digits_quality.py --configs meanflow:diffusion=meanflow,sample.steps=1 --sample-steps 2 4

Each config NAME:OVERRIDES (comma-separated train.py overrides; `sample.*` ones also choose the sampler that judges)
is trained once into <out>/<NAME> with a checkpoint every --ckpt-every steps. Its final checkpoint, and the newest
checkpoint within each --budgets training time, sample 1000 digits (100 per class, EMA weights) with the sampler of
the config, and a classifier trained on real digits (an RBF support-vector machine, ~99% accurate on held-out digits)
labels every sample: the score is the share assigned to the conditioning class. The Frechet distance between
samples and real digits is measured in the raw 64-pixel space, and (FD-digits, with its class accuracy) on the
features of the digits network of evaluation/digits.py, the metric `python train.py` itself reports. Each is printed
next to the same number for real held-out digits, the reference a perfect generator would reach.

The learning rate is constant after warm-up and every draw is a function of (seed, step), so the checkpoint at step
k of a longer run is exactly the final checkpoint of a k-step run: one training run per config gives every budget.
Training time is the loop's own (metrics.jsonl step_time), without start-up, checkpoint writes or the final grid.
"""

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import linalg
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from utils.logger import read_metrics  # noqa: E402

DEFAULT_CONFIGS = ("ddpm:diffusion=ddpm", "flow:diffusion=flow")


def frechet(a, b):
    """Frechet distance between Gaussians fitted to two sets of row vectors."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # border pixels of 8x8 digits are always 0: both covariances are singular
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def judge(images, labels):
    """Score uint8 digit samples (N, 8, 8[, 1]) conditioned on `labels` against the real digits.

    Returns the share judged as their conditioning class and the Frechet distance in pixel space, each next
    to the same measurement of real held-out digits.
    """
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(digits.data, digits.target, test_size=0.3, random_state=0,
                                                        stratify=digits.target)
    classifier = SVC(gamma=0.001, C=10).fit(x_train, y_train)
    samples = np.asarray(images).reshape(len(images), -1).astype(np.float64) / 255 * 16  # back to 0..16
    return {
        "class_match": float((classifier.predict(samples) == np.asarray(labels)).mean()),
        "class_match_real_heldout": float((classifier.predict(x_test) == y_test).mean()),
        "frechet_pixels": frechet(samples, x_train),
        "frechet_pixels_real_heldout": frechet(x_test, x_train),
        **digits_network_scores(images, labels),
    }


def digits_network_scores(images, labels):
    """FD on the digits feature network (evaluation/digits.py) against its train-split reference, and its class
    accuracy, with the held-out digits' values (the floor) beside them."""
    sys.path.insert(0, str(ROOT))
    from evaluation import digits_floor, digits_reference, evaluate
    from evaluation.inputs import ImageSource

    images = np.asarray(images).reshape(len(images), 8, 8, 1)
    reference = digits_reference()
    result = evaluate(ImageSource.from_array(images, labels=np.asarray(labels)), reference, features="digits",
                      progress=False)
    floor = digits_floor(reference)
    return {"fd_digits": result["fid"], "fd_digits_real_heldout": floor["fid"],
            "class_accuracy_digits_net": result["class_accuracy"],
            "class_accuracy_digits_net_real_heldout": floor["class_accuracy"]}


def parse_config(spec):
    """'flow:diffusion=flow,sample.steps=25' -> ('flow', ['diffusion=flow', 'sample.steps=25'])."""
    name, sep, overrides = spec.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"config {spec!r} must be NAME:OVERRIDE[,OVERRIDE...] (NAME: for none)")
    return name, [o for o in overrides.split(",") if o]


def training_seconds(run_dir):
    """{step: seconds of training up to that step} from metrics.jsonl (each row averages its window's steps)."""
    rows = read_metrics(run_dir / "metrics.jsonl", warn=False)   # a run still writing may have a torn last line
    rows = [r for r in rows if "step_time" in r]
    elapsed, last, out = 0.0, 0, {}
    for r in rows:
        elapsed += r["step_time"] * (r["step"] - last)
        last = r["step"]
        out[r["step"]] = elapsed
    return out


def sample_and_judge(ckpt, out, sample_overrides, num_samples, cfg_scale):
    start = time.perf_counter()
    subprocess.run([sys.executable, "sample.py", f"ckpt={ckpt}", f"num_samples={num_samples}", f"out={out}",
                    f"cfg_scale={cfg_scale}", "batch_size=500", *sample_overrides], cwd=ROOT, check=True)
    seconds = time.perf_counter() - start
    data = np.load(out / "samples.npz")
    provenance = json.loads((out / "samples.json").read_text())
    sampler = provenance["sampler"] + (f"-{provenance['ode']['method']}" if provenance["sampler"] == "ode" else "")
    return {"sampler": f"{sampler}-{provenance['steps']}", "cfg_scale": cfg_scale, "sample_seconds": seconds,
            **judge(data["arr_0"], data["arr_1"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", type=parse_config, default=[parse_config(c) for c in DEFAULT_CONFIGS],
                        metavar="NAME:OVERRIDES", help=f"default: {' '.join(DEFAULT_CONFIGS)}")
    parser.add_argument("--common", nargs="*", default=[], help="overrides for every config (e.g. train.steps=3000)")
    parser.add_argument("--budgets", nargs="*", type=float, default=[60, 120, 220],
                        help="training seconds at which to judge the newest checkpoint as well")
    parser.add_argument("--ckpt-every", type=int, default=100)
    parser.add_argument("--out", default="runs/digits-quality")
    parser.add_argument("--skip-train", action="store_true", help="judge existing runs in --out")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--cfg-scale", type=float, nargs="+", default=[1.0], help="judge the final checkpoint at each")
    parser.add_argument("--sample-steps", type=int, nargs="*", default=[],
                        help="judge the final checkpoint with each of these sampler step counts too (one-step "
                             "objectives: 1 2 4), beside the config's own sample.steps")
    args = parser.parse_args()
    out_root = Path(args.out)

    results = []
    for name, overrides in args.configs:
        run_dir = out_root / name
        train_overrides = [*args.common, *overrides]
        sample_overrides = [o.removeprefix("sample.") for o in train_overrides if o.startswith("sample.")]
        wall = None
        if not args.skip_train:
            start = time.perf_counter()
            subprocess.run([sys.executable, "train.py", f"run_dir={run_dir}", "logger=none",
                            f"train.ckpt_every={args.ckpt_every}", "train.keep_last=0", *train_overrides],
                           cwd=ROOT, check=True)
            wall = time.perf_counter() - start
        seconds = training_seconds(run_dir)
        ckpts = sorted((run_dir / "checkpoints").glob("*.pt"), key=lambda p: int(p.stem))
        final = int(ckpts[-1].stem)
        row = {"config": name, "overrides": train_overrides, "steps": final, "train_seconds": seconds[final],
               "train_wall_seconds": wall, "final": [], "budgets": []}
        own = [o for o in sample_overrides if not o.startswith("steps=")]
        for scale in args.cfg_scale:
            judged = sample_and_judge(ckpts[-1], run_dir / "samples" / f"judge-final-cfg{scale:g}", sample_overrides,
                                      args.num_samples, scale)
            row["final"].append(judged)
            for steps in args.sample_steps:
                row["final"].append(sample_and_judge(ckpts[-1], run_dir / "samples" / f"judge-final-cfg{scale:g}-"
                                                     f"steps{steps}", [*own, f"steps={steps}"], args.num_samples, scale))
        for budget in args.budgets:
            within = [int(p.stem) for p in ckpts if seconds.get(int(p.stem), np.inf) <= budget]
            if not within:
                continue
            step = within[-1]
            judged = sample_and_judge(run_dir / "checkpoints" / f"{step:07d}.pt",
                                      run_dir / "samples" / f"judge-{step:07d}", sample_overrides, args.num_samples, 1.0)
            row["budgets"].append({"budget_seconds": budget, "step": step, "train_seconds": seconds[step], **judged})
        results.append(row)
        (out_root / "digits_quality.json").write_text(json.dumps(results, indent=2))

    real = results[0]["final"][0]
    print(f"\n{'config':16s}{'steps':>7s}{'train s':>9s}{'sampler':>16s}{'cfg':>5s}{'judged':>9s}{'Frechet':>9s}"
          f"{'FD-digits':>11s}{'net acc.':>10s}")
    for row in results:
        for judged in row["final"]:
            print(f"{row['config']:16s}{row['steps']:7d}{row['train_seconds']:9.0f}{judged['sampler']:>16s}"
                  f"{judged['cfg_scale']:5g}{judged['class_match']:9.1%}{judged['frechet_pixels']:9.2f}"
                  f"{judged['fd_digits']:11.3f}{judged['class_accuracy_digits_net']:10.1%}")
    print(f"{'real held-out digits':53s}{real['class_match_real_heldout']:9.1%}{real['frechet_pixels_real_heldout']:9.2f}"
          f"{real['fd_digits_real_heldout']:11.3f}{real['class_accuracy_digits_net_real_heldout']:10.1%}")
    if any(row["budgets"] for row in results):
        print(f"\ntime to quality (no guidance): judged as class / Frechet (pixels) / FD-digits after N s of training")
        print(f"{'config':16s}" + "".join(f"{b:>23g}" for b in args.budgets))
        for row in results:
            cells = {b["budget_seconds"]: f"{b['class_match']:.1%} / {b['frechet_pixels']:.1f}" for b in row["budgets"]}
            cells = {k: v + f" / {b['fd_digits']:.2f}" for (k, v), b in zip(cells.items(), row["budgets"])}
            print(f"{row['config']:16s}" + "".join(f"{cells.get(b, '-'):>23s}" for b in args.budgets))
    print(f"results: {out_root / 'digits_quality.json'}")


if __name__ == "__main__":
    main()
