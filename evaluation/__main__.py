"""Command line: FID (+ IS, precision/recall, class accuracy) of samples against a reference, reference statistics,
and the digits feature network.

    python -m evaluation fid samples.npz --ref VIRTUAL_imagenet256_labeled.npz [--is] [--pr] [--sfid] [--out r.json]
    python -m evaluation ref --data digits --split train --features digits --out refs/digits.npz
    python -m evaluation fid samples.npz --ref refs/digits.npz --features digits [--pr] [--is]
    python -m evaluation ref /path/to/images_or_samples.npz --features dinov2 --weights dinov2.safetensors --out r.npz
    python -m evaluation train-digits              # retrain the digits network (seconds) and rewrite its weights

`fid` prints the numbers and writes a JSON (default: <samples>_eval.json beside the first input) holding
the metrics, the sample count, the reference file and its SHA-256, the feature extractor and its weights,
and every key of the sampling sidecar (samples.json or provenance.json beside the samples: sampler, steps,
cfg_scale, cfg_channels, ckpt, step, ...).
"""

import argparse
import datetime
import json
import os
import sys

from utils.errors import ConfigError, report_user_errors
from utils.files import atomic_write_text

from .digits import WEIGHTS, digits_source, save_digits_net, train_digits_net
from .evaluator import build_reference, evaluate
from .features import FEATURE_NETWORKS
from .inputs import dataset_source, open_source, read_sidecar


def _common(p):
    p.add_argument("--features", choices=FEATURE_NETWORKS, default="inception",
                   help="the feature network: inception (torch-fidelity, FID), digits (the bundled digits' "
                        "classifier), dinov2 (FD-DINOv2, ViT-L/14)")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="the feature network's weights file (inception: default torch's hub cache; digits: the "
                        "shipped file; dinov2: required)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (same as --weights)")
    p.add_argument("--no-download", action="store_true", help="never try to download missing Inception weights")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=64, help="images per Inception forward pass")
    p.add_argument("--num-samples", type=int, default=None, help="use the first N images (error if fewer)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fid", help="FID (+ IS, precision/recall) of samples against reference statistics")
    p.add_argument("samples", nargs="+", help="samples.npz (ADM format) or image folders; several are merged")
    p.add_argument("--ref", required=True, help="reference statistics: ADM/our .npz, or a torch-fidelity .pt cache")
    p.add_argument("--trust-pickle", action="store_true",
                   help="read a .pt reference that needs full unpickling (anything beyond tensors and float numpy "
                        "arrays); unpickling runs the file's code: only for a file you made or trust")
    p.add_argument("--is", dest="isc", action="store_true", help="also the Inception Score")
    p.add_argument("--pr", dest="prc", action="store_true", help="also precision/recall (k=3, Inception features)")
    p.add_argument("--sfid", action="store_true",
                   help="also sFID (spatial features of mixed_6/conv; the reference needs mu_s, sigma_s)")
    p.add_argument("--ref-images", nargs="+", default=None,
                   help="reference images for precision/recall (default: `features` or `arr_0` of the --ref npz)")
    p.add_argument("--isc-splits", type=int, default=10)
    p.add_argument("--out", default=None, help="result JSON (default: <first samples>_eval.json)")
    _common(p)

    p = sub.add_parser("ref", help="reference statistics (npz: mu, sigma, mu_s, sigma_s float64, n) of images "
                                   "or a dataset")
    p.add_argument("sources", nargs="*", help="samples .npz files or image folders")
    p.add_argument("--data", default=None, help="a dataset name for data.build_dataset (e.g. digits, imagefolder)")
    p.add_argument("--split", choices=("all", "train", "heldout"), default="all",
                   help="--data digits: all 1797 digits, or the digits network's 70%% train / 30%% held-out split")
    p.add_argument("--data-path", default=None, help="dataset root (data=imagefolder)")
    p.add_argument("--image-size", type=int, default=None, help="dataset image size (data=imagefolder)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for --data")
    p.add_argument("--save-features", action="store_true",
                   help="also store the (N, 2048) float32 features, for precision/recall against this reference")
    p.add_argument("--out", required=True, help="output .npz")
    _common(p)

    p = sub.add_parser("train-digits", help="retrain the digits feature network and rewrite its weights file")
    p.add_argument("--out", default=None, help="weights file (default: evaluation/weights/digits_net.pt)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser.parse_args(argv)


def _default_out(spec):
    spec = os.path.abspath(spec).rstrip(os.sep)
    return (spec[:-4] if spec.endswith(".npz") else spec) + "_eval.json"


def _write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _stamp(argv):
    return {"command": ["python", "-m", "evaluation", *argv],
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def run_fid(args, argv):
    sidecar = next((s for s in map(read_sidecar, args.samples) if s), {})
    result = evaluate(
        [open_source(s) for s in args.samples], args.ref, isc=args.isc, prc=args.prc, sfid=args.sfid,
        ref_images=[open_source(s) for s in args.ref_images] if args.ref_images else None,
        num_samples=args.num_samples, device=args.device, batch_size=args.batch_size, isc_splits=args.isc_splits,
        download=not args.no_download, progress=not args.quiet, features=args.features,
        weights=args.weights or args.inception_weights, trust_pickle=args.trust_pickle,
    )
    # The sidecar's sampling provenance (sampler, steps, cfg_scale, ckpt, ...) goes in as it is; the
    # evaluator's own measurements (num_samples, ...) win on a clash.
    out = {**sidecar, **result, **_stamp(argv)}
    path = args.out or _default_out(args.samples[0])
    _write_json(path, out)

    name = "FID" if args.features == "inception" else f"FD-{args.features}"
    print(f"{name:10s} {result['fid']:.4f}  ({result['num_samples']:,} samples vs {os.path.basename(args.ref)})")
    if "class_accuracy" in result:
        print(f"class acc. {result['class_accuracy']:.2%}  (classified as their conditioning label)")
    if args.sfid:
        print(f"sFID       {result['sfid']:.4f}")
    if args.isc:
        print(f"IS         {result['inception_score_mean']:.3f} ± {result['inception_score_std']:.3f}")
    if args.prc:
        print(f"precision  {result['precision']:.4f}")
        print(f"recall     {result['recall']:.4f}")
    print(f"wrote {path}")
    return out


def run_ref(args, argv):
    if bool(args.sources) == bool(args.data):
        raise ConfigError("ref: give either image sources (npz / folders) or --data NAME, not both or neither")
    if args.split != "all" and args.data != "digits":
        raise ConfigError("ref: --split train|heldout is the digits network's split; it needs --data digits")
    if args.data == "digits" and args.split != "all":
        sources = [digits_source(args.split)]
    elif args.data:
        sources = [dataset_source(args.data, path=args.data_path, image_size=args.image_size,
                                  num_workers=args.workers)]
    else:
        sources = [open_source(s) for s in args.sources]
    info = build_reference(
        sources, args.out, num_samples=args.num_samples, save_features=args.save_features, device=args.device,
        batch_size=args.batch_size, download=not args.no_download, progress=not args.quiet, features=args.features,
        weights=args.weights or args.inception_weights,
    )
    info.update(sources=[s.name for s in sources], **_stamp(argv))
    meta = info["path"][:-4] + ".json"
    _write_json(meta, info)
    print(f"wrote {info['path']}  (n={info['n']:,}, sha256={info['sha256'][:16]}…); provenance in {meta}")
    return info


def run_train_digits(args):
    payload = save_digits_net(train_digits_net(progress=True), args.out or WEIGHTS)
    print(f"wrote {args.out or WEIGHTS}: held-out accuracy {payload['held_out_accuracy']:.2%}, "
          f"sha256 {payload['sha256'][:16]}…")
    return payload


def main(argv=None):
    """A user mistake (a missing file or weights, a mismatched reference, a bad option) prints one message and exits
    with status 2; --debug (or HYDRA_FULL_ERROR=1) shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)

    def run():
        if args.command == "train-digits":
            return run_train_digits(args)
        return run_fid(args, argv) if args.command == "fid" else run_ref(args, argv)
    return report_user_errors(run, debug=lambda: args.debug)()


if __name__ == "__main__":
    main()
