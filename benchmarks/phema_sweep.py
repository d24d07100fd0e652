"""Post-hoc EMA sweep (EDM2, Karras et al. 2024, 2312.02696, Sec. 3): reconstruct a run's EMA at several lengths
sigma_rel, sample each with sample.py, score it, and plot FD against sigma_rel with the best marked.

    python -m benchmarks.phema_sweep runs/digits/DiT-Mini-2 --sigma-rel 0.02 0.05 0.10 0.20
    python -m benchmarks.phema_sweep RUN --sigma-rel 0.05 0.10 --sample-args num_samples=5000 device=cuda \\
        --features inception --ref VIRTUAL_imagenet256_labeled.npz

The reconstructions are utils/phema.py's (`python -m utils.phema RUN --sigma-rel ...` writes them without scoring):
run_dir/phema/reconstructed-<images>-<sigma_rel>.pt. Each is sampled with sample.py's overrides `--sample-args`
(default 1000 samples) and scored with the digits network against the digits' train split on digits runs, else
with `--features` against `--ref`. Writes run_dir/phema/phema_sweep.png and phema_sweep.json.
"""

import argparse
import json
from pathlib import Path

import matplotlib
import numpy as np
import torch
from hydra import compose, initialize_config_dir

import sample as sample_script
from evaluation import ImageSource, digits_reference, evaluate
from utils.errors import ConfigError, report_user_errors
from utils.phema import add_arguments, write_reconstructions

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def score(path, sigma_rel, out, sample_args=(), features=None, reference=None, weights=None):
    """Sample one reconstructed checkpoint with sample.py and score it: {"sigma_rel", "fid", "features"[,
    "class_accuracy"]}. features: default digits for digits runs, else inception (which needs `reference`)."""
    data = torch.load(path, map_location="cpu", weights_only=True)["config"]["data"]["name"]
    net = features or ("digits" if data == "digits" else "inception")
    ref = reference or (digits_reference() if net == "digits" else None)
    if ref is None:
        raise ConfigError(f"the sweep scores with {net} features: give --ref <statistics npz made with them>")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt={path}", f"out={Path(out) / f'samples-{sigma_rel:.3f}'}",
                                           *sample_args])
    arrays = np.load(sample_script.run(cfg) / "samples.npz")
    result = evaluate(ImageSource.from_array(arrays["arr_0"], labels=arrays["arr_1"]), ref, features=net,
                      weights=weights, progress=False)
    row = {"sigma_rel": sigma_rel, "fid": float(result["fid"]), "features": net}
    if "class_accuracy" in result:
        row["class_accuracy"] = float(result["class_accuracy"])
    print(f"sigma_rel {sigma_rel:.3f}: FD ({net}) {row['fid']:.4f}")
    return row


def plot(rows, best, path):
    """FD against sigma_rel, the best marked."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["sigma_rel"] for r in rows], [r["fid"] for r in rows], "o-")
    ax.plot([best["sigma_rel"]], [best["fid"]], "r*", markersize=14, label=f"best: sigma_rel {best['sigma_rel']:.3f}")
    ax.set_xlabel("EMA length sigma_rel (post-hoc)")
    ax.set_ylabel(f"FD ({best['features']} features)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def sweep(written, sigma_rels, out, sample_args=(), features=None, reference=None, weights=None):
    """Score each reconstruction (see score) and plot the sweep into `out`; returns (rows, best)."""
    rows = [score(path, sigma_rel, out, sample_args, features, reference, weights)
            for path, sigma_rel in zip(written, sigma_rels)]
    best = min(rows, key=lambda r: r["fid"])
    plot(rows, best, Path(out) / "phema_sweep.png")
    (Path(out) / "phema_sweep.json").write_text(json.dumps({"rows": rows, "best": best}, indent=1))
    print(f"best sigma_rel {best['sigma_rel']:.3f} (FD {best['fid']:.4f}); plot {Path(out) / 'phema_sweep.png'}")
    return rows, best


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.phema_sweep", description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--sample-args", nargs="*", default=["num_samples=1000", "batch_size=500"],
                        help="sample.py overrides (e.g. steps=25 device=cuda)")
    parser.add_argument("--features", default=None, help="default: digits for digits runs, else inception")
    parser.add_argument("--ref", default=None, help="reference statistics (default for digits: the train split)")
    parser.add_argument("--weights", default=None, help="the feature network's weights file")
    args = parser.parse_args(argv)
    written = write_reconstructions(args.run_dir, args.sigma_rel, args.images)
    return sweep(written, args.sigma_rel, Path(args.run_dir) / "phema", args.sample_args, args.features, args.ref,
                 args.weights)


if __name__ == "__main__":
    report_user_errors(main)()
