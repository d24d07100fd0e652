"""Feature networks behind one interface: the digits network, FD-DINOv2 (random weights), reference records."""

import json
import math

import numpy as np
import pytest
import torch

import evaluation
from conftest import TINY, compose_config, read_run_metrics, run_script
from evaluation import FIDScorer, build_reference, digits_floor, digits_reference, digits_source, evaluate
from evaluation.digits import (DigitsFeatures, digits_split, held_out_accuracy, load_digits_net, state_sha256,
                               train_digits_net)
from evaluation.inputs import ImageSource


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return digits_reference(tmp_path_factory.mktemp("cache"))


# ------------------------------------------------------------------------------------------------------------
# The digits network
# ------------------------------------------------------------------------------------------------------------

def test_digits_network_training_is_deterministic():
    a, b = (train_digits_net(epochs=1) for _ in range(2))
    assert state_sha256(a.state_dict()) == state_sha256(b.state_dict())
    assert state_sha256(a.state_dict()) != state_sha256(train_digits_net(epochs=1, seed=1).state_dict())


def test_shipped_digits_network_is_accurate_and_intact():
    net, info = load_digits_net()
    assert state_sha256(net.state_dict()) == info["sha256"]
    assert held_out_accuracy(net) >= 0.98 and info["held_out_accuracy"] >= 0.98


def test_damaged_weights_are_refused(tmp_path):
    payload = torch.load(evaluation.digits.WEIGHTS, weights_only=True)
    payload["state_dict"]["fc.bias"] = payload["state_dict"]["fc.bias"] + 1
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not match its recorded SHA-256"):
        load_digits_net(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="train-digits"):
        load_digits_net(tmp_path / "absent.pt")


def test_digits_features_layers_and_input_checks():
    x_train, _, _, _ = digits_split()
    out = DigitsFeatures(layers=("pool", "logits", "spatial"))(x_train[:5])
    assert out["pool"].shape == (5, 128) and out["logits"].shape == (5, 10) and out["spatial"].shape == (5, 16, 128)
    rgb = DigitsFeatures()(x_train[:5].expand(-1, 3, -1, -1))   # grey stored as RGB gives the same features
    torch.testing.assert_close(rgb["pool"], out["pool"])
    with pytest.raises(ValueError, match="8x8 grey"):
        DigitsFeatures()(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------------------------
# FD on digits features: real data near the floor, noise far above, a trained model between
# ------------------------------------------------------------------------------------------------------------

def test_real_digits_score_the_floor_and_noise_far_above(reference):
    floor = digits_floor(reference)
    train = evaluate(digits_source("train"), reference, features="digits", progress=False)
    assert train["fid"] < 1e-6 * max(1.0, floor["fid"]) + 1e-8     # the reference's own images
    assert floor["class_accuracy"] >= 0.98 and 0 < floor["fid"]
    noise = torch.randint(0, 256, (540, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    labels = np.arange(540) % 10
    noisy = evaluate(ImageSource.from_array(noise, labels=labels), reference, features="digits", progress=False)
    assert noisy["fid"] > 20 * floor["fid"] and noisy["class_accuracy"] < 0.3
    assert noisy["features"] == "digits" and noisy["feature_extractor"]["weights_sha256"]


@pytest.mark.slow   # subprocesses: over 10 s on 2 cores (the default suite stays near 5 minutes)
def test_fid_of_a_briefly_trained_model_lies_between(reference, tmp_path):
    import sample as sample_script
    import train as train_script
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith("train.steps")] + ["train.steps=150", "train.batch_size=64",
                                                                       "diffusion=flow", "fid.at_end=false", f"run_dir={run_dir}"]
    train_script.train(compose_config(overrides=overrides))
    out = sample_script.run(compose_config("sample", [f"ckpt={run_dir}", "num_samples=540", "batch_size=540",
                                                      "use_ema=false", "steps=10", "device=cpu", f"out={tmp_path}/s"]))
    model = evaluate(out / "samples.npz", reference, features="digits", progress=False)
    floor = digits_floor(reference)
    noise = torch.randint(0, 256, (540, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    noisy = evaluate(ImageSource.from_array(noise), reference, features="digits", progress=False)
    assert floor["fid"] < model["fid"] < noisy["fid"]
    assert 0.0 <= model["class_accuracy"] <= 1.0


def test_a_reference_from_another_network_is_refused(tmp_path, reference):
    weights = tmp_path / "inception.pth"
    evaluation.write_random_inception_weights(weights)
    x_train, _, _, _ = digits_split()
    inception_ref = tmp_path / "inception.npz"
    build_reference(ImageSource.from_array(x_train[:4]), inception_ref, inception_weights=str(weights),
                    progress=False)
    with pytest.raises(ValueError, match="holds inception features but this evaluation uses digits"):
        FIDScorer(inception_ref, features="digits")
    with pytest.raises(ValueError, match="holds digits features but this evaluation uses inception"):
        evaluate(ImageSource.from_array(x_train[:4]), reference, inception_weights=str(weights), progress=False)
    record = np.load(reference)
    assert str(record["feature_network"]) == "digits" and len(str(record["feature_weights_sha256"])) == 64


@pytest.mark.slow   # subprocesses: over 10 s on 2 cores (the default suite stays near 5 minutes)
def test_cli_ref_and_fid_with_digits_features(tmp_path):
    run_script(["-m", "evaluation", "ref", "--data", "digits", "--split", "train", "--features", "digits",
                "--save-features", "--out", str(tmp_path / "ref.npz"), "--quiet"])
    x_train, y_train, x_test, y_test = digits_split()
    np.savez(tmp_path / "samples.npz", arr_0=x_test.permute(0, 2, 3, 1).numpy(), arr_1=y_test.numpy())
    result = run_script(["-m", "evaluation", "fid", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"),
                         "--features", "digits", "--pr", "--is", "--quiet"])
    assert "FD-digits" in result.stdout and "class acc." in result.stdout
    saved = json.loads((tmp_path / "samples_eval.json").read_text())
    assert saved["class_accuracy"] >= 0.98 and 0 < saved["precision"] <= 1 and saved["inception_score_mean"] > 5
    assert saved["fid"] == pytest.approx(digits_floor(tmp_path / "ref.npz")["fid"], rel=1e-9)


def test_in_loop_fid_on_the_default_config(tmp_path, monkeypatch):
    import train as train_script
    monkeypatch.setenv("DIT_CACHE", str(tmp_path / "cache"))
    train_script.train(compose_config(overrides=[*TINY, f"run_dir={tmp_path}/run", "fid.every=2",
                                                 "fid.num_samples=20", "fid.batch_size=10"]))
    rows = read_run_metrics(tmp_path / "run")
    scored = [r for r in rows if "fid" in r]
    assert [r["step"] for r in scored] == [2, 4]
    for row in scored:
        assert row["fid_features"] == "digits" and math.isfinite(row["fid"]) and row["fid"] > row["fid_floor"] > 0
        assert 0 <= row["class_accuracy"] <= 1 and row["class_accuracy_floor"] >= 0.98
    assert list((tmp_path / "cache").glob("digits-train-*.npz"))


# ------------------------------------------------------------------------------------------------------------
# FD-DINOv2
# ------------------------------------------------------------------------------------------------------------

DINO_SMALL = "vit_small_patch14_dinov2"   # the ViT-L's architecture family at a test-sized width


@pytest.fixture(scope="module")
def dino_weights(tmp_path_factory):
    """A random DINOv2-architecture state dict in the hub's 518-px layout (37x37 position grid), as a file."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model(DINO_SMALL, pretrained=False, num_classes=0, img_size=518)
    path = tmp_path_factory.mktemp("dino") / "dinov2_random.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.slow   # DINOv2-S at 224 px, ~7 s
def test_fd_dinov2_equals_a_float64_reference(dino_weights, tmp_path):
    """FD-DINOv2 as the code computes it (DINOv2Features -> FeatureStats -> frechet_distance) against a float64
    reference built apart from it: timm's ViT made here from the weights file with the position grid resampled by
    hand, EDM2's preprocessing written out, and the distance by scipy from the centred features alone, through
    tr((S1 S2)^1/2) = nuclear norm of A1 A2^T / sqrt((n1 - 1)(n2 - 1)) for S = A^T A / (n - 1)."""
    import scipy.linalg
    import timm
    import torch.nn.functional as F
    from timm.models.vision_transformer import VisionTransformer

    from evaluation import FeatureStats, fid_from_stats
    from evaluation.dinov2 import DINOv2Features
    # timm initialises the layer scales to 1e-5, which leaves the CLS feature all but blind to the image (spread
    # 2e-5 over images): at 1 every block counts, so a wrong resize, normalisation or position grid shows.
    weights = {k: torch.ones_like(v) if k.endswith(".gamma") else v
               for k, v in torch.load(dino_weights, weights_only=True).items()}
    torch.save(weights, tmp_path / "dinov2_layer_scale_1.pth")
    dino_weights = tmp_path / "dinov2_layer_scale_1.pth"
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (6, 3, 40, 40), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (6, 3, 40, 40), generator=g, dtype=torch.uint8)
    features = DINOv2Features(dino_weights, device="cpu", batch_size=4, model_name=DINO_SMALL)
    assert isinstance(features.model, VisionTransformer)   # timm's network, not a hand-written ViT
    fa, fb = features(a)["cls"], features(b)["cls"]
    assert fa.shape == (6, 384)
    ours = fid_from_stats(FeatureStats(384).update(fa).reference(), FeatureStats(384).update(fb).reference())

    # The reference network: the file's 37x37 position grid resampled to 224 px's 16x16 (bicubic, antialiased),
    # every weight and step in float64.
    state = {k: v.double() for k, v in torch.load(dino_weights, weights_only=True).items()}
    grid = state["pos_embed"][:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True).flatten(2).transpose(1, 2)
    state["pos_embed"] = torch.cat([state["pos_embed"][:, :1], grid], 1)
    model = timm.create_model(DINO_SMALL, pretrained=False, num_classes=0, img_size=224).double().eval()
    model.load_state_dict(state, strict=True)

    def reference_features(x):   # EDM2: bicubic antialiased resize of 0..255 values to 224, /255, ImageNet mean/std
        x = F.interpolate(x.double(), size=(224, 224), mode="bicubic", antialias=True) / 255
        mean = torch.tensor((0.485, 0.456, 0.406), dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor((0.229, 0.224, 0.225), dtype=torch.float64).view(1, 3, 1, 1)
        with torch.no_grad():
            return model.forward_features((x - mean) / std)[:, 0].numpy()

    def frechet(f1, f2):
        a1, a2 = f1 - f1.mean(0), f2 - f2.mean(0)
        n1, n2 = len(f1) - 1, len(f2) - 1
        tr_sqrt = scipy.linalg.svdvals(a1 @ a2.T).sum() / np.sqrt(n1 * n2)
        return ((f1.mean(0) - f2.mean(0)) ** 2).sum() + (a1 ** 2).sum() / n1 + (a2 ** 2).sum() / n2 - 2 * tr_sqrt

    ra, rb = reference_features(a), reference_features(b)
    np.testing.assert_allclose(fa.double().numpy(), ra, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fb.double().numpy(), rb, rtol=1e-4, atol=1e-4)
    assert ours == pytest.approx(frechet(ra, rb), rel=1e-3)


@pytest.mark.slow   # subprocesses: over 10 s on 2 cores (the default suite stays near 5 minutes)
def test_missing_dinov2_weights_name_the_file_and_the_setting(tmp_path):
    from evaluation.dinov2 import MissingDINOv2Weights
    with pytest.raises(MissingDINOv2Weights) as error:
        evaluation.build_features("dinov2", tmp_path / "absent.safetensors")
    message = str(error.value)
    assert "vit_large_patch14_dinov2.lvd142m" in message and "--weights" in message and "fid.weights" in message
    result = run_script(["-m", "evaluation", "ref", "--data", "digits", "--features", "dinov2", "--out",
                         str(tmp_path / "r.npz")], check=False)
    assert result.returncode == 2 and "model.safetensors" in result.stderr and "Traceback" not in result.stderr
