"""evaluation/: Frechet distance against closed forms and scipy, float64 statistics that merge exactly,
reference files, image sources, and the real torch-fidelity Inception (random weights written by the test,
so everything runs offline) against torch_fidelity.calculate_metrics.

The Inception network costs ~0.2-1 s per image on 2 CPU cores whatever the input size (it resizes to
299x299), and every 2048-d Frechet distance a few seconds, so the tests that run them use a handful of
images and, but for one smoke test, are marked slow.
"""

import json
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch

import evaluation
from evaluation import (
    FeatureStats,
    FIDScorer,
    ImageSource,
    InceptionFeatures,
    MissingInceptionWeights,
    frechet_distance,
    load_reference,
    save_reference,
)
from evaluation.__main__ import main as cli
from evaluation.features import INCEPTION_FILENAME, INCEPTION_URL, as_rgb_uint8
from utils.errors import MissingFile


def random_covariance(rng, d, rank=None):
    x = rng.standard_normal((rank or 2 * d, d)) * rng.uniform(0.1, 2.0, d)
    return x.T @ x / x.shape[0]


def random_rotation(rng, d):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q


# ---------------------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["svd", "sqrtm"])
def test_frechet_distance_closed_form_for_gaussians(method):
    # Covariances sharing eigenvectors: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    d = 32
    q = random_rotation(rng, d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T, method=method)
    assert got == pytest.approx(expected, rel=1e-10)
    # A pure scale S2 = c^2 S1 gives (1 - c)^2 tr S1.
    s = random_covariance(rng, d)
    assert frechet_distance(mu1, s, mu1, 4 * s, method=method) == pytest.approx(np.trace(s), rel=1e-10)


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(1)
    d = 64
    s1, s2 = random_covariance(rng, d), random_covariance(rng, d)  # full rank, not commuting
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    reference = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                 - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-10)
    assert frechet_distance(mu1, s1, mu2, s2, method="sqrtm") == pytest.approx(reference, rel=1e-12)


def test_frechet_distance_singular_covariances_and_identical_sets():
    # Fewer samples than dimensions (FID-5K style with 2048-d features, or any tiny test): rank-deficient
    # covariances. Exact value: tr((S1 S2)^{1/2}) = nuclear norm of X1c^T X2c / (n - 1) for centred samples.
    rng = np.random.default_rng(2)
    n, d = 16, 64
    x1 = rng.standard_normal((n, d)) + 0.5
    x2 = rng.standard_normal((n, d)) * 1.3
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
    tr_sqrt = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / (n - 1)
    exact = np.sum((x1.mean(0) - x2.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(x1.mean(0), s1, x2.mean(0), s2) == pytest.approx(exact, rel=1e-12)
    assert frechet_distance(x1.mean(0), s1, x2.mean(0), s2, method="sqrtm") == pytest.approx(exact, rel=1e-5)
    # Identical sets: 0 up to rounding, singular or not.
    assert abs(frechet_distance(x1.mean(0), s1, x1.mean(0), s1)) < 1e-10 * np.trace(s1)
    s = random_covariance(rng, d)
    assert abs(frechet_distance(np.ones(d), s, np.ones(d), s)) < 1e-10 * np.trace(s)


# ---------------------------------------------------------------------------------------------------------
# Statistics and reference files
# ---------------------------------------------------------------------------------------------------------

def test_merged_shard_statistics_equal_one_pass():
    rng = np.random.default_rng(3)
    f = torch.from_numpy(rng.random((203, 48)).astype(np.float32) * 5)  # pool features are >= 0, O(1)
    one_pass = FeatureStats(48).update(f)
    np.testing.assert_allclose(one_pass.mean(), f.double().mean(0).numpy(), rtol=1e-13)
    np.testing.assert_allclose(one_pass.covariance(), np.cov(f.double().numpy(), rowvar=False), rtol=1e-10, atol=1e-14)

    # Uneven shards (ranks / chunks), merged directly and via saved state: the same sums.
    shards = [FeatureStats(48).update(part) for part in f.split([1, 100, 2, 100])]
    merged = FeatureStats(48)
    for shard in shards:
        merged.merge(FeatureStats.from_state_dict(shard.state_dict()))
    assert merged.count == 203
    np.testing.assert_allclose(merged.mean(), one_pass.mean(), rtol=1e-14)
    np.testing.assert_allclose(merged.covariance(), one_pass.covariance(), rtol=1e-10, atol=1e-12)

    # Reference files carry n, so they merge too.
    a, b = FeatureStats(48).update(f[:80]).reference(), FeatureStats(48).update(f[80:]).reference()
    rebuilt = FeatureStats.from_moments(a["mu"], a["sigma"], a["n"]).merge(
        FeatureStats.from_moments(b["mu"], b["sigma"], b["n"]))
    np.testing.assert_allclose(rebuilt.covariance(), one_pass.covariance(), rtol=1e-9, atol=1e-13)


def _all_reduce_rank(rank, store, shards, out):
    """One of two gloo processes: its own shard's statistics, summed over both ranks, saved for the parent."""
    import torch.distributed as dist

    torch.set_num_threads(1)  # a forked child keeps no thread pool of the parent's (as DataLoader workers do)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=len(shards))
    try:
        stats = FeatureStats(shards[rank].shape[1]).update(shards[rank]).all_reduce()
        np.savez(f"{out}{rank}.npz", n=stats.count, mu=stats.mean(), sigma=stats.covariance())
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_all_reduce_over_two_processes_gives_the_statistics_of_all_features(tmp_path):
    """Two gloo processes holding uneven shards (3 and 7 features) both end with the count, mean and covariance
    of all 10, as numpy computes them from the whole set in float64. Forked, so no child imports anything again."""
    import torch.multiprocessing as mp

    f = torch.from_numpy(np.random.default_rng(5).random((10, 8)).astype(np.float32))
    mp.start_processes(_all_reduce_rank, args=(tmp_path / "store", list(f.split([3, 7])), tmp_path / "rank"),
                       nprocs=2, start_method="fork")
    for rank in range(2):
        got = np.load(tmp_path / f"rank{rank}.npz")
        assert got["n"] == 10
        np.testing.assert_allclose(got["mu"], f.double().mean(0).numpy(), rtol=1e-12)
        np.testing.assert_allclose(got["sigma"], np.cov(f.double().numpy(), rowvar=False), rtol=1e-10, atol=1e-14)


def test_reference_files_roundtrip(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = rng.standard_normal(16), random_covariance(rng, 16)

    ours = load_reference(save_reference(tmp_path / "ours.npz", mu, sigma, n=np.int64(7)))
    assert ours["mu"].dtype == ours["sigma"].dtype == np.float64 and ours["n"] == 7
    np.testing.assert_array_equal(ours["sigma"], sigma)

    # ADM's files: float mu/sigma among other keys (images, spatial statistics).
    np.savez(tmp_path / "adm.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu.astype(np.float32), sigma=sigma,
             mu_s=mu, sigma_s=sigma)
    adm = load_reference(tmp_path / "adm.npz")
    assert adm["mu"].dtype == np.float64 and "n" not in adm
    np.testing.assert_array_equal(adm["sigma_s"], sigma)                     # the sFID statistics come along
    assert "mu_s" not in ours

    # torch-fidelity's cache: statistics dict (float32 mu, float64 sigma) and a features tensor.
    torch.save({"mu": mu.astype(np.float32), "sigma": sigma}, tmp_path / "x-inception-v3-compat-stat-fid-2048.pt")
    tf = load_reference(tmp_path / "x-inception-v3-compat-stat-fid-2048.pt")
    assert tf["mu"].dtype == np.float64
    np.testing.assert_allclose(tf["mu"], mu, rtol=1e-6)
    features = torch.rand(30, 16)
    torch.save(features, tmp_path / "x-inception-v3-compat-features-2048.pt")
    fs = load_reference(tmp_path / "x-inception-v3-compat-features-2048.pt")
    np.testing.assert_allclose(fs["sigma"], np.cov(features.double().numpy(), rowvar=False), rtol=1e-9)

    with pytest.raises(KeyError, match="mu"):
        np.savez(tmp_path / "samples.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
        load_reference(tmp_path / "samples.npz")


def test_a_missing_reference_is_one_message_naming_the_file_and_how_to_make_one(tmp_path, capsys):
    missing = tmp_path / "missing.npz"
    with pytest.raises(MissingFile, match="python -m evaluation ref"):     # also a FileNotFoundError
        load_reference(missing)
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit) as e:       # `python -m evaluation fid samples.npz --ref missing.npz`
        cli(["fid", str(tmp_path / "samples.npz"), "--ref", str(missing), "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.startswith(f"error: reference statistics {missing} not found") and "--out" in err


# ---------------------------------------------------------------------------------------------------------
# Image sources
# ---------------------------------------------------------------------------------------------------------

def write_png_folder(folder, images_nhwc):
    from PIL import Image

    folder.mkdir()
    for i, im in enumerate(images_nhwc):
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(folder / f"{i:06d}.png")
    return folder


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("compressed", [False, True])
def test_npz_and_folder_sources_yield_the_same_uint8(tmp_path, channels, compressed):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (11, 9, 7, channels), dtype=np.uint8)
    (np.savez_compressed if compressed else np.savez)(tmp_path / "s.npz", arr_0=images, arr_1=np.arange(11))
    src = ImageSource.from_npz(tmp_path / "s.npz")
    assert len(src) == 11
    batches = list(src.batches(batch_size=4))
    assert [b.shape[0] for b in batches] == [4, 4, 3]
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    assert torch.equal(torch.cat(batches), nchw)
    assert torch.equal(torch.cat(list(src.batches(4, limit=5))), nchw[:5])
    with pytest.raises(ValueError):
        src.batches(4, limit=12)

    # A folder of the same images as PNGs: read as RGB, i.e. grey repeated to 3 channels.
    folder = ImageSource.from_folder(write_png_folder(tmp_path / "png", images))
    assert torch.equal(torch.cat(list(folder.batches(4))), as_rgb_uint8(nchw))


def test_as_rgb_uint8():
    grey = torch.randint(0, 256, (2, 1, 5, 5), dtype=torch.uint8)
    rgb = as_rgb_uint8(grey)
    assert rgb.shape == (2, 3, 5, 5) and all(torch.equal(rgb[:, c], grey[:, 0]) for c in range(3))
    with pytest.raises(ValueError):
        as_rgb_uint8(grey.float())
    with pytest.raises(ValueError):
        as_rgb_uint8(torch.zeros(2, 5, 5, 3, dtype=torch.uint8))  # NHWC by mistake


class TinyDataset(torch.utils.data.Dataset):
    """Items like data.build_dataset's: (x float32 (C, H, W) in [-1, 1], y int)."""

    def __init__(self):
        self.x = torch.linspace(-1, 1, 5 * 3 * 4 * 4).reshape(5, 3, 4, 4)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 2


def test_dataset_source_converts_to_uint8():
    src = ImageSource.from_dataset(TinyDataset())
    out = torch.cat(list(src.batches(batch_size=2)))
    expected = ((TinyDataset().x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    assert out.dtype == torch.uint8 and torch.equal(out, expected)
    assert out.min() == 0 and out.max() == 255


def test_one_to_uint8_rounds_to_the_nearest_level_as_the_official_dit_does():
    import evaluation.inputs
    from utils.images import to_uint8
    assert evaluation.to_uint8 is to_uint8 and evaluation.inputs.to_uint8 is to_uint8    # one copy
    levels = torch.arange(256, dtype=torch.float64)
    offsets = torch.tensor([-0.45, -0.2, 0.0, 0.2, 0.45], dtype=torch.float64)
    x = ((levels[:, None] + offsets) / 127.5 - 1).float()                   # (256, 5): around every level
    expected = levels[:, None].expand(-1, 5).to(torch.uint8)
    assert torch.equal(to_uint8(x), expected)
    assert torch.equal(torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8), expected)   # DiT's sample_ddp.py
    adm = ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)                  # ADM's image_sample.py truncates:
    assert torch.equal(adm[1:, :2], expected[1:, :2] - 1)                   # a level lower just below a level
    assert to_uint8(torch.tensor([-1.5, 1.5])).tolist() == [0, 255]


def test_read_sidecar(tmp_path):
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((1, 2, 2, 3), np.uint8))
    assert evaluation.read_sidecar(tmp_path / "samples.npz") == {}
    (tmp_path / "provenance.json").write_text(json.dumps({"sampler": "ddim", "steps": 50}))
    assert evaluation.read_sidecar(tmp_path / "samples.npz")["sampler"] == "ddim"
    (tmp_path / "samples.json").write_text(json.dumps({"sampler": "ddpm"}))
    assert evaluation.read_sidecar(tmp_path / "samples.npz") == {"sampler": "ddpm"}


# ---------------------------------------------------------------------------------------------------------
# Missing weights: a clear message, never the network
# ---------------------------------------------------------------------------------------------------------

def test_missing_weights_message(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # an empty hub cache

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    hub_file = str(tmp_path / "hub" / "checkpoints" / INCEPTION_FILENAME)
    for kwargs in ({"weights_path": tmp_path / "nope.pth"}, {"download": False}, {}):
        with pytest.raises(MissingInceptionWeights) as e:
            evaluation.resolve_inception_weights(**kwargs)
        message = str(e.value)
        for needle in (INCEPTION_FILENAME, INCEPTION_URL, hub_file, "--inception-weights"):
            assert needle in message
    assert "no network in tests" in message

    # The CLI turns it into a message and exit status 2, not a traceback.
    save_reference(tmp_path / "ref.npz", np.zeros(4), np.eye(4))
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit) as e:
        cli(["fid", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--no-download"])
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------------------
# The real Inception network (random weights)
# ---------------------------------------------------------------------------------------------------------

N = 5  # images per set: enough for precision/recall's k=3 neighbourhoods


def make_sets(n=N):
    """Two clearly different uint8 (n, 3, 16, 16) sets: noise at n contrast levels, and smooth ramps."""
    g = torch.Generator().manual_seed(0)
    contrast = torch.linspace(0.2, 1.0, n).view(n, 1, 1, 1)
    noise = (torch.rand(n, 3, 16, 16, generator=g) * 255 * contrast).round().to(torch.uint8)
    ramp = torch.linspace(0, 1, 16)
    smooth = torch.stack([
        (255 * torch.stack([ramp[:, None] * ramp[None, :] * (i + 1) / n, ramp[None, :].expand(16, 16),
                            ramp[:, None].expand(16, 16) * (1 - i / n)])).round().to(torch.uint8)
        for i in range(n)])
    return noise, smooth


class UInt8Dataset(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return str(evaluation.write_random_inception_weights(tmp_path_factory.mktemp("inception") / "random.pth"))


@pytest.mark.slow
def test_agrees_with_torch_fidelity_calculate_metrics(weights):
    import torch_fidelity

    noise, smooth = make_sets()
    theirs = torch_fidelity.calculate_metrics(
        input1=UInt8Dataset(noise), input2=UInt8Dataset(smooth), fid=True, isc=True, prc=True,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=weights, isc_splits=2,
        cuda=False, cache=False, save_cpu_ram=True, verbose=False,
    )
    extractor = InceptionFeatures(weights, device="cpu", layers=("2048", "logits_unbiased"))
    f_noise, f_smooth = extractor(noise), extractor(smooth)
    ours_fid = evaluation.fid_from_stats(FeatureStats().update(f_noise["2048"]).reference(),
                                         FeatureStats().update(f_smooth["2048"]).reference())
    assert ours_fid > 1.0
    assert ours_fid == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    is_mean, is_std = evaluation.inception_score(f_noise["logits_unbiased"], splits=2)
    assert is_mean > 1.05  # non-trivial logits, so the comparison means something
    assert is_mean - 1 == pytest.approx(theirs["inception_score_mean"] - 1, rel=1e-5)
    assert is_std == pytest.approx(theirs["inception_score_std"], rel=1e-4, abs=1e-7)
    precision, recall = evaluation.precision_recall(f_noise["2048"], f_smooth["2048"])
    assert (precision, recall) == (theirs["precision"], theirs["recall"])


def test_inception_features_smoke(weights):
    # The real network on a grey 8x8 image (the digits' format): shapes, and grey == its RGB replication.
    grey = torch.arange(64, dtype=torch.uint8).mul(4).view(1, 1, 8, 8)
    extractor = InceptionFeatures(weights, device="cpu", layers=("2048", "logits_unbiased"))
    f_grey, f_rgb = extractor(grey), extractor(grey.repeat(1, 3, 1, 1))
    assert f_grey["2048"].shape == (1, 2048) and f_grey["logits_unbiased"].shape == (1, 1008)
    assert torch.isfinite(f_grey["2048"]).all() and f_grey["2048"].std() > 0
    assert torch.equal(f_grey["2048"], f_rgb["2048"])


@pytest.mark.slow   # ~2 s
def test_sfid_features_are_the_first_7_channels_of_mixed_6d_branch1x1(weights):
    """ADM's `mixed_6/conv` is the 1x1 branch of the fourth 17x17 block; sFID keeps channels 0-6, flattened
    in TensorFlow's height, width, channel order."""
    images = make_sets(2)[0]
    extractor = InceptionFeatures(weights, device="cpu", layers=("2048", "mixed_6/conv"))
    block_inputs = []
    extractor.net.Mixed_6d.register_forward_pre_hook(lambda module, args: block_inputs.append(args[0]))
    features = extractor(images)
    with torch.no_grad():
        branch = extractor.net.Mixed_6d.branch1x1(block_inputs[0])             # (N, 192, 17, 17)
    assert branch.shape == (2, 192, 17, 17) and features["mixed_6/conv"].shape == (2, 2023)
    np.testing.assert_array_equal(features["mixed_6/conv"].view(2, 17, 17, 7).numpy(),
                                  branch[:, :7].permute(0, 2, 3, 1).numpy())
    # Asking for the spatial layer leaves the pool features unchanged.
    torch.testing.assert_close(features["2048"], InceptionFeatures(weights, device="cpu")(images)["2048"],
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown Inception layers"):
        InceptionFeatures(weights, device="cpu", layers=("mixed_6",))


def test_sfid_without_spatial_reference_statistics_is_a_clear_error(weights, tmp_path):
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    save_reference(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048))
    with pytest.raises(ValueError, match="mu_s, sigma_s"):
        evaluation.evaluate(tmp_path / "samples.npz", tmp_path / "ref.npz", sfid=True, inception_weights=weights,
                            device="cpu", progress=False)


@pytest.mark.slow
def test_cli_reference_and_fid(weights, tmp_path):
    noise, smooth = make_sets(3)
    # Reference statistics of the smooth set, written by the CLI from an ADM-format npz.
    np.savez(tmp_path / "smooth.npz", arr_0=smooth.permute(0, 2, 3, 1).numpy())
    cli(["ref", str(tmp_path / "smooth.npz"), "--out", str(tmp_path / "ref.npz"), "--inception-weights", weights,
         "--device", "cpu", "--quiet"])
    ref = load_reference(tmp_path / "ref.npz")
    assert ref["n"] == 3 and ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048)

    # The same images as a folder of PNGs, through the in-training FIDScorer: the same statistics.
    folder = ImageSource.from_folder(write_png_folder(tmp_path / "smooth_png", smooth.permute(0, 2, 3, 1).numpy()))
    scorer = FIDScorer(tmp_path / "ref.npz", inception_weights=weights, device="cpu")
    from_folder = scorer.accumulate(folder.batches(64), total=len(folder)).reference()
    np.testing.assert_allclose(from_folder["mu"], ref["mu"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(from_folder["sigma"], ref["sigma"], rtol=1e-12, atol=1e-15)

    # Samples as an ADM npz with a sampling sidecar -> FID and a provenance JSON.
    np.savez(tmp_path / "samples.npz", arr_0=noise.permute(0, 2, 3, 1).numpy(), arr_1=np.arange(3, dtype=np.int64))
    sidecar = {"sampler": "ddpm", "steps": 250, "cfg_scale": 1.5, "cfg_channels": 3, "ckpt": "c.pt", "step": 7}
    (tmp_path / "samples.json").write_text(json.dumps(sidecar))
    out = cli(["fid", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception-weights",
               weights, "--device", "cpu", "--quiet", "--sfid"])
    written = json.loads((tmp_path / "samples_eval.json").read_text())
    assert written["fid"] == out["fid"] > 1.0
    # sFID: the Frechet distance of the 2023 spatial features, reference statistics written by `ref`.
    assert ref["mu_s"].shape == (2023,) and ref["sigma_s"].shape == (2023, 2023)
    spatial = InceptionFeatures(weights, device="cpu", layers=("mixed_6/conv",))
    a, b = (spatial(x)["mixed_6/conv"].double().numpy() for x in (noise, smooth))
    expected = evaluation.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert written["sfid"] == out["sfid"] > 0.0
    assert out["sfid"] == pytest.approx(expected, rel=1e-9)
    assert {k: written[k] for k in sidecar} == sidecar
    assert written["num_samples"] == 3
    assert written["reference_sha256"] == evaluation.features.file_sha256(tmp_path / "ref.npz")
    assert written["feature_extractor"]["name"] == "torch-fidelity inception-v3-compat"


@pytest.mark.slow
def test_fid_from_npz_equals_fid_from_folder(weights, tmp_path):
    noise, smooth = make_sets(3)
    ref = FeatureStats().update(InceptionFeatures(weights, device="cpu")(smooth)["2048"]).reference()
    nhwc = noise.permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "samples.npz", arr_0=nhwc)
    save_reference(tmp_path / "ref.npz", ref["mu"], ref["sigma"])
    from_npz = evaluation.evaluate(tmp_path / "samples.npz", tmp_path / "ref.npz", inception_weights=weights,
                                   device="cpu", progress=False)["fid"]
    folder = ImageSource.from_folder(write_png_folder(tmp_path / "png", nhwc))
    from_folder = FIDScorer(ref, inception_weights=weights, device="cpu").score(folder.batches(64))
    assert from_npz > 1.0
    assert from_folder == pytest.approx(from_npz, rel=1e-12)


@pytest.mark.slow
def test_reference_from_dataset_cli(weights, tmp_path):
    # `--data` goes through data.build_dataset; the digits are 8x8 grey.
    pytest.importorskip("data")
    cli(["ref", "--data", "digits", "--num-samples", "3", "--out", str(tmp_path / "digits.npz"),
         "--inception-weights", weights, "--device", "cpu", "--quiet"])
    ref = load_reference(tmp_path / "digits.npz")
    assert ref["n"] == 3 and np.isfinite(ref["sigma"]).all()
    meta = json.loads((tmp_path / "digits.json").read_text())
    assert meta["sources"] == ["data:digits"] and meta["n"] == 3
