"""The evaluators: FIDScorer for FID-K inside training, evaluate() for FID-50K (+ IS, precision/recall) of
sample files, build_reference() for the reference statistics of any image source.

All three run images through one InceptionFeatures and keep float64 sums (FeatureStats); per-sample
features are kept only for IS and precision/recall, which need them.
"""

import os

import numpy as np
import torch

from .features import FID_LAYER, IS_LAYER, SFID_DIM, SFID_LAYER, InceptionFeatures, file_sha256
from .fid import fid_from_stats
from .inputs import ImageSource, open_source
from .scores import inception_score, precision_recall
from .stats import FeatureStats, load_reference, save_reference


def compute_statistics(extractor, batches, total=None, keep=(), progress=True, desc="Inception features",
                       spatial=None):
    """Run uint8 batches through `extractor` -> (FeatureStats of the pool features, {layer: (N, D) features}
    for each layer in `keep`, on the extractor's device). spatial: a FeatureStats that the sFID features are
    added to (the extractor must compute SFID_LAYER)."""
    stats = FeatureStats(device=extractor.device)
    kept = {name: [] for name in keep}
    for features in extractor.iterate(batches, total=total, progress=progress, desc=desc):
        stats.update(features[FID_LAYER])
        if spatial is not None:
            spatial.update(features[SFID_LAYER])
        for name in keep:
            kept[name].append(features[name])
    return stats, {name: torch.cat(fs) for name, fs in kept.items()}


def spatial_stats(extractor):
    """An empty FeatureStats for the sFID features (7 x 17 x 17 = 2023 dimensions)."""
    return FeatureStats(dim=SFID_DIM, device=extractor.device)


class FIDScorer:
    """FID of generated uint8 images against fixed reference statistics; network and reference loaded once.

    For FID every N steps on K EMA samples: each rank feeds its share of the K samples to `score`;
    with all_reduce=True the float64 sums are added over ranks first, so every rank returns the FID of all
    K samples. Call it on every rank (the all_reduce is collective).

        scorer = FIDScorer("refs/digits.npz", device=device)            # once
        fid = scorer.score(batches_of_uint8_nchw, all_reduce=ddp)        # every N steps
    """

    def __init__(self, reference, inception_weights=None, device=None, batch_size=64, download=True,
                 progress=False):
        self.extractor = InceptionFeatures(inception_weights, device=device, batch_size=batch_size,
                                           layers=(FID_LAYER,), download=download)
        if isinstance(reference, FeatureStats):
            reference = reference.reference()
        elif not isinstance(reference, dict):
            reference = load_reference(reference)
        self.reference = reference
        self.progress = progress

    @property
    def device(self):
        return self.extractor.device

    def accumulate(self, batches, stats=None, total=None):
        """Add the features of uint8 (N, C, H, W) batches to `stats` (a new FeatureStats when None)."""
        new, _ = compute_statistics(self.extractor, batches, total=total, progress=self.progress, desc="FID features")
        return new if stats is None else stats.merge(new)

    def fid(self, stats):
        """FID of accumulated statistics against the reference."""
        return fid_from_stats(stats.reference(), self.reference)

    def score(self, batches, all_reduce=False, total=None):
        """FID of the images in `batches` (summed over DDP ranks first when all_reduce)."""
        stats = self.accumulate(batches, total=total)
        if all_reduce:
            stats.all_reduce()
        return self.fid(stats)


def _take(sources, num_samples, batch_size):
    """Batches from the sources in order, stopping after num_samples images (all when None)."""
    available = sum(len(s) for s in sources)
    if num_samples is not None and num_samples > available:
        raise ValueError(f"asked for {num_samples} samples, the inputs hold {available}")
    remaining = available if num_samples is None else num_samples
    for source in sources:
        n = min(len(source), remaining)
        if n:
            yield from source.batches(batch_size, limit=n)
        remaining -= n


def _as_sources(sources):
    sources = sources if isinstance(sources, (list, tuple)) else [sources]
    return [s if isinstance(s, ImageSource) else open_source(s) for s in sources]


def _reference_features(extractor, reference_path, ref_images, batch_size, progress):
    """Pool features of the reference images for precision/recall: `ref_images`, else the reference npz's
    `features` (build_reference(save_features=True)) or `arr_0` (ADM's reference batches ship images)."""
    if ref_images is None and reference_path.endswith(".npz"):
        with np.load(reference_path) as f:
            if "features" in f:
                return torch.from_numpy(f["features"]).to(extractor.device)
            if "arr_0" in f:
                ref_images = ImageSource.from_npz(reference_path)
    if ref_images is None:
        raise ValueError(f"precision/recall needs reference images or features: {reference_path} has neither "
                         f"(`features` or `arr_0`); pass ref_images (CLI: --ref-images)")
    source = _as_sources(ref_images)
    _, kept = compute_statistics(extractor, _take(source, None, batch_size), total=sum(map(len, source)),
                                 keep=(FID_LAYER,), progress=progress, desc="reference features")
    return kept[FID_LAYER]


def evaluate(samples, reference, *, isc=False, prc=False, sfid=False, ref_images=None,
             num_samples=None, inception_weights=None, device=None, batch_size=64, isc_splits=10,
             download=True, progress=True):
    """FID (and, on request, Inception Score `isc` / precision-recall `prc`, torch-fidelity's names, and sFID
    `sfid`) of samples against reference statistics.

    samples: ImageSource(s) or path(s) of samples.npz files / image folders; several are merged (shards).
    reference: a statistics file (load_reference). num_samples: use the first N (error if fewer).
    Returns a dict of the metrics plus provenance (sample count, reference hash, feature extractor).
    """
    sources = _as_sources(samples)
    reference_path = os.path.abspath(os.fspath(reference))
    ref = load_reference(reference_path)
    if sfid and "mu_s" not in ref:
        raise ValueError(f"sFID needs the reference's spatial statistics (mu_s, sigma_s), which {reference_path} "
                         f"lacks; use ADM's reference batch or rebuild it with `python -m evaluation ref ...`")
    layers = (FID_LAYER,) + ((IS_LAYER,) if isc else ()) + ((SFID_LAYER,) if sfid else ())
    extractor = InceptionFeatures(inception_weights, device=device, batch_size=batch_size, layers=layers,
                                  download=download)
    total = num_samples if num_samples is not None else sum(len(s) for s in sources)
    keep = [name for name, wanted in ((FID_LAYER, prc), (IS_LAYER, isc)) if wanted]
    spatial = spatial_stats(extractor) if sfid else None
    stats, kept = compute_statistics(extractor, _take(sources, num_samples, batch_size), total=total, keep=keep,
                                     progress=progress, desc="sample features", spatial=spatial)

    result = {"fid": fid_from_stats(stats.reference(), ref)}
    if sfid:
        result["sfid"] = fid_from_stats(spatial.reference(), {"mu": ref["mu_s"], "sigma": ref["sigma_s"]})
    if isc:
        result["inception_score_mean"], result["inception_score_std"] = inception_score(kept[IS_LAYER], isc_splits)
    if prc:
        ref_features = _reference_features(extractor, reference_path, ref_images, batch_size, progress)
        result["precision"], result["recall"] = precision_recall(kept[FID_LAYER], ref_features)
        result["precision_recall_reference_samples"] = int(ref_features.shape[0])
    result.update(
        num_samples=stats.count,
        samples=[s.name for s in sources],
        reference=reference_path,
        reference_sha256=file_sha256(reference_path),
        reference_num_samples=ref.get("n"),
        feature_extractor=extractor.provenance(),
    )
    return result


def build_reference(source, out, *, num_samples=None, save_features=False, inception_weights=None, device=None,
                    batch_size=64, download=True, progress=True):
    """Reference statistics of an image source (ImageSource, samples npz or folder) written to `out` (npz with
    float64 `mu`, `sigma`, the sFID statistics `mu_s`, `sigma_s` (ADM's keys) and the count `n`; with
    save_features also the float32 pool features, which precision/recall can use later).
    Returns {"path", "n", "sha256"}."""
    sources = _as_sources(source)
    extractor = InceptionFeatures(inception_weights, device=device, batch_size=batch_size,
                                  layers=(FID_LAYER, SFID_LAYER), download=download)
    total = num_samples if num_samples is not None else sum(len(s) for s in sources)
    spatial = spatial_stats(extractor)
    stats, kept = compute_statistics(extractor, _take(sources, num_samples, batch_size), total=total,
                                     keep=(FID_LAYER,) if save_features else (), progress=progress,
                                     desc="reference features", spatial=spatial)
    spatial_ref = spatial.reference()
    extra = {"n": np.int64(stats.count), "mu_s": spatial_ref["mu"], "sigma_s": spatial_ref["sigma"]}
    if save_features:
        extra["features"] = kept[FID_LAYER].cpu().numpy().astype(np.float32)
    ref = stats.reference()
    path = save_reference(out, ref["mu"], ref["sigma"], **extra)
    return {"path": os.path.abspath(path), "n": stats.count, "sha256": file_sha256(path),
            "feature_extractor": extractor.provenance()}
