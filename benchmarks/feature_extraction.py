"""Throughput of feature extraction for FID-type metrics (each feature network + float64 statistics), images/s.

    python benchmarks/feature_extraction.py                                  # all three networks
    python benchmarks/feature_extraction.py --features inception --device cpu --images 32 --batch-size 16

Times the evaluator's inner loop (uint8 batch -> device -> network -> float64 sums) on random uint8 images already in
memory, so file reading is excluded: Inception and DINOv2 on 256x256 RGB input (resized inside to 299 and 224), the
digits network on 8x8 grey digits. Inception uses its real weights when it finds them (--inception-weights, else
torch's hub cache), otherwise random weights of the same network, which run at the same speed; DINOv2 (ViT-L/14)
likewise with --dinov2-weights, else random weights. FID-50K's extraction time is about 50,000 / (images/s).
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluation import MissingInceptionWeights, build_features, compute_statistics  # noqa: E402
from evaluation.features import resolve_inception_weights, write_random_inception_weights  # noqa: E402


def extractor_for(name, args, tmp, batch_size):
    """(extractor, which weights, input shape) for one network."""
    if name == "inception":
        try:
            weights, kind = resolve_inception_weights(args.inception_weights, download=False), "real"
        except MissingInceptionWeights:
            weights, kind = write_random_inception_weights(os.path.join(tmp, "random.pth")), "random"
        return build_features("inception", weights, device=args.device, batch_size=batch_size), kind, (3, 256, 256)
    if name == "dinov2":
        weights, kind = args.dinov2_weights, "real"
        if weights is None:
            import timm
            weights, kind = os.path.join(tmp, "dinov2_random.pth"), "random"
            torch.save(timm.create_model("vit_large_patch14_dinov2", pretrained=False, num_classes=0,
                                         img_size=518).state_dict(), weights)
        return build_features("dinov2", weights, device=args.device, batch_size=batch_size), kind, (3, 256, 256)
    return build_features("digits", device=args.device, batch_size=batch_size), "shipped", (1, 8, 8)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--features", nargs="+", default=["digits", "inception", "dinov2"],
                   choices=("digits", "inception", "dinov2"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on GPU; on CPU 16 (digits: 1000)")
    p.add_argument("--images", type=int, default=None, help="images timed (default: 4096 on GPU, 32 on CPU; "
                                                            "digits 10000)")
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--dinov2-weights", default=None)
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    name_of_device = torch.cuda.get_device_name(args.device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {name_of_device}")
    for name in args.features:
        digits = name == "digits"
        batch_size = args.batch_size or (256 if gpu else 1000 if digits else 16)
        n_images = args.images or (4096 if gpu else 10000 if digits else 32)
        with tempfile.TemporaryDirectory() as tmp:
            extractor, kind, shape = extractor_for(name, args, tmp, batch_size)
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (batch_size, *shape), generator=g, dtype=torch.uint8)
        n_batches = max(1, n_images // batch_size)
        compute_statistics(extractor, [images], progress=False)  # warm-up: cuDNN autotuning, allocator, threads
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        stats, _ = compute_statistics(extractor, (images for _ in range(n_batches)), total=n_batches * batch_size,
                                      progress=False)
        stats.sum.cpu()  # waits for the device
        seconds = time.perf_counter() - start
        rate = stats.count / seconds
        print(f"{name:10s} weights {kind}, batch {batch_size}, input {'x'.join(map(str, shape))}: "
              f"{rate:10.1f} images/s  ({stats.count} images in {seconds:.2f} s; 50K images ~ "
              f"{50000 / rate / 60:.1f} min)")


if __name__ == "__main__":
    main()
