"""Throughput of FID feature extraction (torch-fidelity's inception-v3-compat + float64 statistics), images/s.

    python benchmarks/feature_extraction.py                          # CUDA when available, else CPU
    python benchmarks/feature_extraction.py --device cpu --images 32 --batch-size 16

Times the evaluator's inner loop (uint8 batch -> device -> Inception at 299x299 -> float64 sums) on random
uint8 images already in memory, so file reading is excluded. Uses the real weights when it finds them
(--inception-weights, else torch's hub cache); otherwise random weights of the same network, which run at
the same speed. FID-50K's extraction time is about 50,000 / (images/s).
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluation import InceptionFeatures, MissingInceptionWeights, compute_statistics  # noqa: E402
from evaluation.features import resolve_inception_weights, write_random_inception_weights  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on GPU, 16 on CPU")
    p.add_argument("--image-size", type=int, default=256, help="input resolution (resized to 299 inside)")
    p.add_argument("--images", type=int, default=None, help="images timed (default: 4096 on GPU, 32 on CPU)")
    p.add_argument("--inception-weights", default=None)
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    batch_size = args.batch_size or (256 if gpu else 16)
    n_images = args.images or (4096 if gpu else 32)

    with tempfile.TemporaryDirectory() as tmp:
        try:
            weights, kind = resolve_inception_weights(args.inception_weights, download=False), "real"
        except MissingInceptionWeights:
            weights, kind = write_random_inception_weights(os.path.join(tmp, "random.pth")), "random"
        extractor = InceptionFeatures(weights, device=args.device, batch_size=batch_size)

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, args.image_size, args.image_size), generator=g, dtype=torch.uint8)
    n_batches = max(1, n_images // batch_size)

    compute_statistics(extractor, [images], progress=False)  # warm-up: cuDNN autotuning, allocator, threads
    if gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    stats, _ = compute_statistics(extractor, (images for _ in range(n_batches)), total=n_batches * batch_size,
                                  progress=False)
    stats.sum.cpu()  # waits for the device
    seconds = time.perf_counter() - start

    name = torch.cuda.get_device_name(args.device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    rate = stats.count / seconds
    print(f"device {name}, weights {kind}, batch {batch_size}, input {args.image_size}x{args.image_size}, "
          f"{stats.count} images in {seconds:.2f} s")
    print(f"feature extraction: {rate:.1f} images/s  (FID-50K extraction ~ {50000 / rate / 60:.1f} min)")


if __name__ == "__main__":
    main()
