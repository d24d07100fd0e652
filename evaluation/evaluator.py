"""The evaluators: FIDScorer for FID-K inside training, evaluate() for FID-50K (+ IS, precision/recall, class
accuracy) of sample files, build_reference() for the reference statistics of any image source.

All three run images through one feature network (features="inception" | "digits" | "dinov2", see
features.build_features) and keep float64 sums (FeatureStats); per-sample features are kept only for IS,
precision/recall and class accuracy, which need them. A reference file records the network that made it
(`feature_network`, and the weights' SHA-256 for networks of this repository), and a mismatch is refused.
"""

import os

import numpy as np
import torch

from utils.errors import ConfigError

from .features import build_features, network_layers
from .fid import fid_from_stats
from .inception import SFID_DIM
from .inputs import ImageSource, open_source
from .network import file_sha256
from .scores import inception_score, precision_recall
from .stats import FeatureStats, load_reference, save_reference


def compute_statistics(extractor, batches, total=None, keep=(), progress=True, desc=None, spatial=None):
    """Run uint8 batches through `extractor` -> (FeatureStats of its FID features, {layer: (N, D) features}
    for each layer in `keep`, on the extractor's device). spatial: a FeatureStats that the sFID features are
    added to (the extractor must compute its spatial_layer)."""
    stats = None
    kept = {name: [] for name in keep}
    for features in extractor.iterate(batches, total=total, progress=progress, desc=desc or f"{extractor.name} features"):
        fid_features = features[extractor.fid_layer]
        if stats is None:
            stats = FeatureStats(dim=fid_features.shape[1], device=extractor.device)
        stats.update(fid_features)
        if spatial is not None:
            spatial.update(features[extractor.spatial_layer])
        for name in keep:
            kept[name].append(features[name])
    if stats is None:
        raise ConfigError("there are no images to compute features of")
    return stats, {name: torch.cat(fs) for name, fs in kept.items()}


def spatial_stats(extractor):
    """An empty FeatureStats for the sFID features (7 x 17 x 17 = 2023 dimensions)."""
    return FeatureStats(dim=SFID_DIM, device=extractor.device)


def network_identity(extractor):
    """What a reference file records about the network that made it."""
    provenance = extractor.provenance()
    return {"feature_network": extractor.name, "feature_weights_sha256": provenance.get("weights_sha256", "")}


def check_reference(reference, extractor, source):
    """Refuse statistics made by another feature network (or other weights of a network of this repository).
    Files without a record (ADM's, torch-fidelity's) are Inception statistics."""
    made_by = reference.get("feature_network", "inception")
    if made_by != extractor.name:
        raise ConfigError(f"the reference {source} holds {made_by} features but this evaluation uses "
                         f"{extractor.name} features; pass the matching one (features={made_by}), or make a "
                         f"reference with `python -m evaluation ref ... --features {extractor.name}`")
    recorded, current = reference.get("feature_weights_sha256"), network_identity(extractor)["feature_weights_sha256"]
    if extractor.name == "digits" and recorded and recorded != current:
        raise ConfigError(f"the reference {source} was made with other {made_by}-network weights (sha256 "
                         f"{recorded[:12]}, now {current[:12]}); rebuild it with `python -m evaluation ref ... "
                         f"--features {made_by}`")


def class_accuracy(logits, labels):
    """Share of samples the feature network's classifier assigns to their conditioning label."""
    labels = torch.as_tensor(labels, device=logits.device)
    return float((logits.argmax(1) == labels).float().mean())


class FIDScorer:
    """FID of generated uint8 images against fixed reference statistics; network and reference loaded once.

    For FID every N steps on K EMA samples: each rank feeds its share of the K samples to `score`;
    with all_reduce=True the float64 sums are added over ranks first, so every rank returns the FID of all
    K samples. Call it on every rank (the all_reduce is collective).

        scorer = FIDScorer("refs/digits.npz", device=device)            # once
        fid = scorer.score(batches_of_uint8_nchw, all_reduce=ddp)        # every N steps
    """

    def __init__(self, reference, inception_weights=None, device=None, batch_size=64, download=True,
                 progress=False, features="inception", weights=None):
        fid_layer, is_layer, _ = network_layers(features)
        layers = (fid_layer,) + ((is_layer,) if features == "digits" else ())  # logits: the class accuracy
        self.extractor = build_features(features, weights or inception_weights, device=device,
                                        batch_size=batch_size, layers=layers, download=download)
        source = "(in memory)"
        if isinstance(reference, FeatureStats):
            reference = {**reference.reference(), **network_identity(self.extractor)}
        elif not isinstance(reference, dict):
            source, reference = reference, load_reference(reference)
        check_reference(reference, self.extractor, source)
        self.reference = reference
        self.progress = progress
        self.last = {}  # the class accuracy of the latest score() when labels were given

    @property
    def device(self):
        return self.extractor.device

    def accumulate(self, batches, stats=None, total=None, keep=()):
        """Add the features of uint8 (N, C, H, W) batches to `stats` (a new FeatureStats when None)."""
        new, kept = compute_statistics(self.extractor, batches, total=total, keep=keep, progress=self.progress,
                                       desc="FID features")
        merged = new if stats is None else stats.merge(new)
        return (merged, kept) if keep else merged

    def fid(self, stats):
        """FID of accumulated statistics against the reference."""
        return fid_from_stats(stats.reference(), self.reference)

    def score(self, batches, all_reduce=False, total=None, labels=None):
        """FID of the images in `batches` (summed over DDP ranks first when all_reduce). With `labels` (this
        rank's, in order) and a network with a classifier, also the class accuracy, in self.last."""
        if labels is None or self.extractor.is_layer not in self.extractor.layers:
            stats = self.accumulate(batches, total=total)
            self.last = {}
        else:
            stats, kept = self.accumulate(batches, total=total, keep=(self.extractor.is_layer,))
            hits = torch.tensor([class_accuracy(kept[self.extractor.is_layer], labels) * len(labels), len(labels)],
                                dtype=torch.float64, device=stats.sum.device)
            if all_reduce:
                torch.distributed.all_reduce(hits)
            self.last = {"class_accuracy": float(hits[0] / hits[1])}
        if all_reduce:
            stats.all_reduce()
        return self.fid(stats)


def _take(sources, num_samples, batch_size):
    """Batches from the sources in order, stopping after num_samples images (all when None)."""
    available = sum(len(s) for s in sources)
    if num_samples is not None and num_samples > available:
        raise ConfigError(f"asked for {num_samples} samples, the inputs hold {available}")
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
    """FID-layer features of the reference images for precision/recall: `ref_images`, else the reference npz's
    `features` (build_reference(save_features=True)) or `arr_0` (ADM's reference batches ship images)."""
    if ref_images is None and reference_path.endswith(".npz"):
        with np.load(reference_path) as f:
            if "features" in f:
                return torch.from_numpy(f["features"]).to(extractor.device)
            if "arr_0" in f:
                ref_images = ImageSource.from_npz(reference_path)
    if ref_images is None:
        raise ConfigError(f"precision/recall needs reference images or features: {reference_path} has neither "
                         f"(`features` or `arr_0`); pass ref_images (CLI: --ref-images)")
    source = _as_sources(ref_images)
    _, kept = compute_statistics(extractor, _take(source, None, batch_size), total=sum(map(len, source)),
                                 keep=(extractor.fid_layer,), progress=progress, desc="reference features")
    return kept[extractor.fid_layer]


def _sample_labels(sources, num_samples):
    """The samples' conditioning labels (arr_1 of each npz), or None when a source has none."""
    if any(s.labels is None for s in sources):
        return None
    labels = np.concatenate([s.labels for s in sources])
    return labels if num_samples is None else labels[:num_samples]


def evaluate(samples, reference, *, isc=False, prc=False, sfid=False, ref_images=None, num_samples=None,
             inception_weights=None, device=None, batch_size=64, isc_splits=10, download=True, progress=True,
             features="inception", weights=None, trust_pickle=False):
    """FID (and, on request, Inception Score `isc` / precision-recall `prc`, torch-fidelity's names, and sFID
    `sfid`) of samples against reference statistics, in the feature space of `features`.

    samples: ImageSource(s) or path(s) of samples.npz files / image folders; several are merged (shards).
    reference: a statistics file (load_reference) made with the same feature network. num_samples: use the first
    N (error if fewer). With a network that classifies (digits) and labelled samples (arr_1), `class_accuracy`
    is the share classified as their conditioning label. Returns a dict of the metrics plus provenance (sample
    count, reference hash, feature extractor).
    """
    sources = _as_sources(samples)
    reference_path = os.path.abspath(os.fspath(reference))
    ref = load_reference(reference_path, trust_pickle=trust_pickle)   # a .pt needing unpickling: only opted in
    if sfid and "mu_s" not in ref:
        raise ConfigError(f"sFID needs the reference's spatial statistics (mu_s, sigma_s), which {reference_path} "
                         f"lacks; use ADM's reference batch or rebuild it with `python -m evaluation ref ...`")
    fid_layer, is_layer, spatial_layer = network_layers(features)
    if sfid and spatial_layer is None:
        raise ConfigError(f"sFID is defined on Inception's spatial features; drop --sfid with --features {features}")
    if isc and is_layer is None:
        raise ConfigError(f"the {features} network has no classifier, so no Inception Score; drop --is")
    labels = _sample_labels(sources, num_samples) if features == "digits" else None  # classes = digit labels
    wants_logits = isc or labels is not None
    layers = (fid_layer,) + ((is_layer,) if wants_logits else ()) + ((spatial_layer,) if sfid else ())
    extractor = build_features(features, weights or inception_weights, device=device, batch_size=batch_size,
                               layers=layers, download=download)
    check_reference(ref, extractor, reference_path)
    total = num_samples if num_samples is not None else sum(len(s) for s in sources)
    keep = [name for name, wanted in ((extractor.fid_layer, prc), (extractor.is_layer, wants_logits)) if wanted]
    spatial = spatial_stats(extractor) if sfid else None
    stats, kept = compute_statistics(extractor, _take(sources, num_samples, batch_size), total=total, keep=keep,
                                     progress=progress, desc="sample features", spatial=spatial)

    result = {"fid": fid_from_stats(stats.reference(), ref)}
    if sfid:
        result["sfid"] = fid_from_stats(spatial.reference(), {"mu": ref["mu_s"], "sigma": ref["sigma_s"]})
    if isc:
        result["inception_score_mean"], result["inception_score_std"] = inception_score(kept[extractor.is_layer],
                                                                                        isc_splits)
    if wants_logits and labels is not None:
        result["class_accuracy"] = class_accuracy(kept[extractor.is_layer], labels)
    if prc:
        ref_features = _reference_features(extractor, reference_path, ref_images, batch_size, progress)
        result["precision"], result["recall"] = precision_recall(kept[extractor.fid_layer], ref_features)
        result["precision_recall_reference_samples"] = int(ref_features.shape[0])
    result.update(
        features=extractor.name,
        num_samples=stats.count,
        samples=[s.name for s in sources],
        reference=reference_path,
        reference_sha256=file_sha256(reference_path),
        reference_num_samples=ref.get("n"),
        feature_extractor=extractor.provenance(),
    )
    return result


def build_reference(source, out, *, num_samples=None, save_features=False, inception_weights=None, device=None,
                    batch_size=64, download=True, progress=True, features="inception", weights=None):
    """Reference statistics of an image source (ImageSource, samples npz or folder) in the feature space of
    `features`, written to `out`: an npz with float64 `mu`, `sigma`, the count `n`, the network that made them
    (`feature_network`, `feature_weights_sha256`), for Inception also the sFID statistics `mu_s`, `sigma_s`
    (ADM's keys), and with save_features the float32 FID-layer features (for precision/recall later).
    Returns {"path", "n", "sha256", "feature_extractor"}."""
    sources = _as_sources(source)
    fid_layer, _, spatial_layer = network_layers(features)
    extractor = build_features(features, weights or inception_weights, device=device, batch_size=batch_size,
                               layers=(fid_layer,) + ((spatial_layer,) if spatial_layer else ()), download=download)
    total = num_samples if num_samples is not None else sum(len(s) for s in sources)
    spatial = spatial_stats(extractor) if extractor.spatial_layer is not None else None
    stats, kept = compute_statistics(extractor, _take(sources, num_samples, batch_size), total=total,
                                     keep=(extractor.fid_layer,) if save_features else (), progress=progress,
                                     desc="reference features", spatial=spatial)
    extra = {"n": np.int64(stats.count), **{k: np.str_(v) for k, v in network_identity(extractor).items()}}
    if spatial is not None:
        spatial_ref = spatial.reference()
        extra.update(mu_s=spatial_ref["mu"], sigma_s=spatial_ref["sigma"])
    if save_features:
        extra["features"] = kept[extractor.fid_layer].cpu().numpy().astype(np.float32)
    ref = stats.reference()
    path = save_reference(out, ref["mu"], ref["sigma"], **extra)
    return {"path": os.path.abspath(path), "n": stats.count, "sha256": file_sha256(path),
            "feature_extractor": extractor.provenance()}
