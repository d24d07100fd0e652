"""What a training run scores itself with: the feature network, the reference and the real-data floor chosen from
plain settings, and the line printed at the end of a run."""

from .real_digits import digits_floor, digits_reference
from .evaluator import FIDScorer
from utils.errors import ConfigError


def training_scorer(*, data_name, features="auto", every=0, at_end="auto", reference=None, weights=None,
                    device=None):
    """(scorer, score at the end?, the real-data floor or None); (None, False, None) when nothing is scored.

    features=auto measures the digits with their own network (no download) and anything else with Inception;
    digits features without a reference use the digits' train split (digits_reference), and their floor is what
    real held-out digits score. Missing weights or references stop here, before any training."""
    if features == "auto":
        features = "digits" if data_name == "digits" else "inception"
    if at_end == "auto":
        at_end = features == "digits" and reference is None
    if not (every or at_end):
        return None, False, None
    if features == "digits" and data_name != "digits":
        raise ConfigError(f"fid.features=digits measures 8x8 digits; data={data_name} needs fid.features=inception "
                          f"(or dinov2)")
    floor = None
    if reference is None:
        if features != "digits":
            raise ConfigError(f"fid.every / fid.at_end with fid.features={features} needs fid.reference=<npz of "
                              f"mu/sigma>; make one with `python -m evaluation ref ... --features {features}`")
        reference = digits_reference()
    if features == "digits":
        floor = digits_floor(reference)
    scorer = FIDScorer(reference, features=features, weights=weights, device=device)
    return scorer, bool(at_end), floor


def quality_line(row, cfg_scale=1.0):
    """The final FID (and class accuracy) of a logged row beside what real data scores."""
    name = "FID" if row["fid_features"] == "inception" else f"FD-{row['fid_features']}"
    text = f"step {row['step']}: {name} of {row['fid_samples']} EMA samples (cfg {cfg_scale:g}) {row['fid']:.2f}"
    if "fid_floor" in row:
        text += f" (real held-out digits: {row['fid_floor']:.2f})"
    if "class_accuracy" in row:
        text += f"; classified as their label: {row['class_accuracy']:.1%}"
        if "class_accuracy_floor" in row:
            text += f" (real held-out digits: {row['class_accuracy_floor']:.1%})"
    return text
