"""Judge the default digits run: does each sample look like the digit it was conditioned on?

    python benchmarks/digits_quality.py                      # train the default (python train.py), then judge
    python benchmarks/digits_quality.py --run runs/digits/DiT-Mini-2 --skip-train --cfg-scale 1.5

A classifier trained on real digits (an RBF support-vector machine, ~99% accurate on held-out digits) labels
every sample; the score is the share assigned to the conditioning class. The Frechet distance between
samples and real digits is measured in the raw 64-pixel space. Both are printed next to the same numbers for
real held-out digits, the reference a perfect generator would reach.
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
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/digits/DiT-Mini-2", help="run_dir of the default training run")
    parser.add_argument("--skip-train", action="store_true", help="judge an existing run without training")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--sampler", default="ddpm")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("train_overrides", nargs="*", help="extra Hydra overrides for train.py")
    args = parser.parse_args()

    train_seconds = None
    if not args.skip_train:
        start = time.perf_counter()
        subprocess.run([sys.executable, "train.py", f"run_dir={args.run}", "logger=none", *args.train_overrides],
                       cwd=ROOT, check=True)
        train_seconds = time.perf_counter() - start
    out = Path(args.run) / "samples" / f"judge-{args.sampler}{args.steps}-cfg{args.cfg_scale:g}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "sample.py", f"ckpt={args.run}", f"num_samples={args.num_samples}",
                    f"sampler={args.sampler}", f"steps={args.steps}", f"cfg_scale={args.cfg_scale}",
                    f"out={out}", "batch_size=500"], cwd=ROOT, check=True)
    sample_seconds = time.perf_counter() - start

    data = np.load(out / "samples.npz")
    result = {"samples": int(len(data["arr_0"])), "sampler": f"{args.sampler}-{args.steps}",
              "cfg_scale": args.cfg_scale, "train_seconds": train_seconds, "sample_seconds": sample_seconds,
              **judge(data["arr_0"], data["arr_1"])}
    print(f"{'':28s}{'samples':>10s}{'real held-out':>16s}")
    print(f"{'judged as their class':28s}{result['class_match']:>10.1%}{result['class_match_real_heldout']:>16.1%}")
    print(f"{'Frechet distance (pixels)':28s}{result['frechet_pixels']:>10.2f}{result['frechet_pixels_real_heldout']:>16.2f}")
    if train_seconds is not None:
        print(f"training took {train_seconds:.0f} s; sampling {result['samples']} took {sample_seconds:.0f} s")
    (out / "judge.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
