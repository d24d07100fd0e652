"""Nothing loaded runs code (issue 28): the Inception weights, reference statistics and checkpoints are read with
torch.load(weights_only=True) (the weights also SHA-256-checked under torch-fidelity's published name), the torch
floor is one where weights_only=True holds, and sample.py fetches no VAE the user did not ask for.

Every file with code in it here carries a live payload: a __reduce__ that copies a file to a marker path when
unpickled. Each test first shows that torch.load(weights_only=False) does run it, then that the code under test
refuses the file and the marker never appears."""

import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

import evaluation
import evaluation.inception as inception
import models.vae
import sample as sample_script
from evaluation import InceptionFeatures, load_reference
from evaluation.__main__ import main as cli
from evaluation.features import (INCEPTION_FILENAME, INCEPTION_SHA256, INCEPTION_URL, BadInceptionWeights,
                                 hub_weights_path, load_inception_state_dict)
from utils.checkpoint import load_checkpoint, resolve_checkpoint
from utils.errors import MissingFile

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------
# The payload
# ------------------------------------------------------------------------------------------------------------

class Payload:
    """Unpickling this copies `source` to `marker`: code that runs from a file."""

    def __init__(self, source, marker):
        self.source, self.marker = str(source), str(marker)

    def __reduce__(self):
        return shutil.copyfile, (self.source, self.marker)


class Plain:
    """A harmless class instance: still not a tensor or primitive, so weights_only=True refuses it too."""

    def __init__(self):
        self.value = 1


@pytest.fixture
def payload(tmp_path):
    """(make, marker): make(obj_around) returns `obj_around(Payload)` pickled with torch.save at a path of your choice;
    marker is the file that appears when the payload runs."""
    source, marker = tmp_path / "payload-source.txt", tmp_path / "payload-ran.txt"
    source.write_text("the payload ran")

    def make(path, wrap=lambda p: p):
        torch.save(wrap(Payload(source, marker)), path)
        # The payload is live: plain unpickling runs it.
        torch.load(path, weights_only=False)
        assert marker.exists(), "the test payload did not run under weights_only=False"
        marker.unlink()
        return path

    return make, marker


# ------------------------------------------------------------------------------------------------------------
# 1. Inception weights: SHA-256 under the published name, weights_only=True always
# ------------------------------------------------------------------------------------------------------------

def test_published_hash_fits_the_file_name():
    assert INCEPTION_FILENAME == "weights-inception-2015-12-05-6726825d.pth" and INCEPTION_URL.endswith(INCEPTION_FILENAME)
    assert len(INCEPTION_SHA256) == 64 and INCEPTION_SHA256.startswith("6726825d")   # torch.hub's prefix convention


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache; downloads fail unless a test replaces the downloader."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return Path(hub_weights_path())


def test_planted_file_in_the_hub_cache_is_refused_and_never_runs(hub, payload, tmp_path):
    make, marker = payload
    hub.parent.mkdir(parents=True)
    make(hub, wrap=lambda p: {"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "x": p})
    with pytest.raises(BadInceptionWeights, match="SHA-256") as e:
        InceptionFeatures(device="cpu", download=False)
    assert str(hub) in str(e.value) and INCEPTION_SHA256 in str(e.value) and INCEPTION_URL in str(e.value)
    assert not marker.exists()
    # Tensors only, right keys and shapes, but not the published file: refused by its hash all the same.
    evaluation.write_random_inception_weights(hub)
    with pytest.raises(BadInceptionWeights, match="not torch-fidelity's published Inception weights"):
        InceptionFeatures(device="cpu", download=False)
    # The same holds for a file with the published name given explicitly.
    explicit = tmp_path / "elsewhere" / INCEPTION_FILENAME
    explicit.parent.mkdir()
    shutil.copyfile(hub, explicit)
    with pytest.raises(BadInceptionWeights, match="SHA-256"):
        InceptionFeatures(explicit, device="cpu")


def test_a_weights_file_with_code_is_refused_under_any_name(payload, tmp_path):
    make, marker = payload
    for wrap in (lambda p: p, lambda p: {"fc.weight": torch.zeros(1), "extra": p}):
        path = make(tmp_path / "my-inception.pth", wrap)
        with pytest.raises(BadInceptionWeights) as e:
            load_inception_state_dict(path)
        message = str(e.value)
        assert str(path) in message and "weights_only=True" in message and INCEPTION_URL in message
        assert not marker.exists()
    torch.save({"fc.weight": torch.zeros(1), "obj": Plain()}, tmp_path / "instance.pth")
    with pytest.raises(BadInceptionWeights, match="instance.pth"):
        load_inception_state_dict(tmp_path / "instance.pth")
    # The CLI: one message and exit status 2, before any network is built.
    evaluation.save_reference(tmp_path / "ref.npz", np.zeros(4), np.eye(4))
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit) as e:
        cli(["fid", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception-weights", str(path),
             "--device", "cpu", "--quiet"])
    assert e.value.code == 2 and not marker.exists()


def test_a_download_lands_only_with_the_published_hash(hub, monkeypatch, tmp_path):
    random = evaluation.write_random_inception_weights(tmp_path / "random.pth")

    def fake_download(url, dst, *args, **kwargs):
        assert url == INCEPTION_URL
        shutil.copyfile(random, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    with pytest.raises(BadInceptionWeights, match="SHA-256"):
        evaluation.resolve_inception_weights()
    assert not hub.parent.exists() or list(hub.parent.iterdir()) == []    # nothing kept, no partial file
    # The same bytes with the hash they should have land in the cache, and load.
    monkeypatch.setattr(inception, "INCEPTION_SHA256", evaluation.features.file_sha256(random))
    assert evaluation.resolve_inception_weights() == str(hub)
    assert sorted(p.name for p in hub.parent.iterdir()) == [INCEPTION_FILENAME]
    state, digest = load_inception_state_dict(hub)
    assert digest == inception.INCEPTION_SHA256 and all(torch.is_tensor(v) for v in state.values())


def test_the_network_built_from_the_safe_state_dict_is_torch_fidelitys(tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    weights = evaluation.write_random_inception_weights(tmp_path / "random.pth")
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    ours = InceptionFeatures(weights, device="cpu")
    assert type(ours.net).__mro__[1] is FeatureExtractorInceptionV3
    a, b = theirs.state_dict(), ours.net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    image = torch.arange(3 * 8 * 8, dtype=torch.int64).remainder(256).to(torch.uint8).view(1, 3, 8, 8)
    torch.testing.assert_close(ours(image)["2048"], theirs(image)[0], rtol=0, atol=0)
    assert ours.provenance()["weights_sha256"] == evaluation.features.file_sha256(weights)


# ------------------------------------------------------------------------------------------------------------
# 2. Reference statistics: weights_only=True, unpickling only behind trust_pickle / --trust-pickle
# ------------------------------------------------------------------------------------------------------------

def test_torch_fidelity_statistics_load_safely(tmp_path):
    mu, sigma = np.arange(4, dtype=np.float32), np.eye(4)
    torch.save({"mu": mu, "sigma": sigma}, tmp_path / "x-inception-v3-compat-stat-fid-2048.pt")  # its cache format
    ref = load_reference(tmp_path / "x-inception-v3-compat-stat-fid-2048.pt")
    assert ref["mu"].dtype == np.float64 and np.array_equal(ref["mu"], mu) and np.array_equal(ref["sigma"], sigma)
    torch.save({"mu": np.array([1, "a"], dtype=object), "sigma": sigma}, tmp_path / "objects.pt")
    with pytest.raises(ValueError, match="--trust-pickle"):      # object arrays are not on the allowed list
        load_reference(tmp_path / "objects.pt")


def test_reference_with_code_is_refused_unless_trusted(payload, tmp_path):
    make, marker = payload
    path = make(tmp_path / "ref.pt", wrap=lambda p: {"mu": torch.zeros(4), "sigma": torch.eye(4), "x": p})
    with pytest.raises(ValueError) as e:
        load_reference(path)
    assert "trust_pickle=True" in str(e.value) and "--trust-pickle" in str(e.value) and str(path) in str(e.value)
    assert not marker.exists()
    # The named opt-in unpickles it, and so runs it: that is what trusting a file means.
    ref = load_reference(path, trust_pickle=True)
    assert ref["mu"].shape == (4,) and marker.exists()


def test_cli_refuses_a_pickled_reference_and_trust_pickle_opts_in(payload, tmp_path, monkeypatch):
    make, marker = payload
    ref = make(tmp_path / "ref.pt", wrap=lambda p: {"mu": np.zeros(4), "sigma": np.eye(4), "x": p})
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    common = ["fid", str(tmp_path / "s.npz"), "--ref", str(ref), "--device", "cpu", "--quiet", "--no-download"]
    with pytest.raises(SystemExit) as e:      # refused before any network is built
        cli(common)
    assert e.value.code == 2 and not marker.exists()
    import evaluation.__main__ as main_module
    seen = {}

    def fake_evaluate(samples, reference, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(main_module, "evaluate", fake_evaluate)
    with pytest.raises(SystemExit):
        cli([*common, "--trust-pickle"])
    assert seen["trust_pickle"] is True


@pytest.mark.slow
def test_cli_trust_pickle_scores_against_a_pickled_reference(payload, tmp_path):
    make, marker = payload
    weights = evaluation.write_random_inception_weights(tmp_path / "random.pth")
    ref = make(tmp_path / "ref.pt", wrap=lambda p: {"mu": np.zeros(2048), "sigma": np.eye(2048), "x": p})
    np.savez(tmp_path / "s.npz", arr_0=np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8))
    out = cli(["fid", str(tmp_path / "s.npz"), "--ref", str(ref), "--inception-weights", str(weights), "--device",
               "cpu", "--quiet", "--trust-pickle"])
    assert np.isfinite(out["fid"]) and marker.exists()


# ------------------------------------------------------------------------------------------------------------
# 3. The torch floor, and its promise: a checkpoint with a pickled object is refused
# ------------------------------------------------------------------------------------------------------------

def _floor(package):
    from packaging.requirements import Requirement
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and Requirement(line).name == package:
            return min(s.version for s in Requirement(line).specifier if s.operator == ">=")
    raise AssertionError(f"{package} is not in requirements.txt")


def test_requirements_floor_is_where_weights_only_holds():
    from packaging.version import Version
    # weights_only=True bypasses: CVE-2025-32434 (fixed in torch 2.6), CVE-2026-24747 (fixed in 2.10).
    assert Version(_floor("torch")) >= Version("2.10")
    assert Version(_floor("torchvision")) >= Version("0.25")   # the torchvision release of torch 2.10
    assert Version(torch.__version__.split("+")[0]) >= Version(_floor("torch"))


def test_a_checkpoint_with_a_pickled_object_is_refused(payload, tmp_path):
    make, marker = payload
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    for i, wrap in enumerate((lambda p: {"model": {"w": torch.zeros(2)}, "step": 1, "config": p}, lambda p: p)):
        path = make(run / f"{i + 1:07d}.pt", wrap)
        with pytest.raises(Exception, match="(?i)weights.only|unpickl|global"):
            load_checkpoint(path)
        with pytest.raises(ValueError, match=str(path.name)):
            resolve_checkpoint(path, set_aside=False)
        assert not marker.exists()
    with pytest.raises(Exception):       # a run folder whose checkpoints all carry code: nothing loads from it
        resolve_checkpoint(tmp_path / "run", set_aside=False)
    assert not marker.exists()
    torch.save({"model": {"w": torch.zeros(2)}, "step": 1, "extra": Plain()}, tmp_path / "instance.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|global"):
        load_checkpoint(tmp_path / "instance.pt")
    # ... and evaluation's reference loader (the .pt path) likewise, without the opt-in.
    with pytest.raises(ValueError, match="--trust-pickle"):
        load_reference(make(tmp_path / "stats.pth"))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------------
# 4. sample.py's VAE: the record is a suggestion; nothing is downloaded the user did not ask for
# ------------------------------------------------------------------------------------------------------------

COMMIT = "0" * 40


def save_tiny_vae(folder, seed=0):
    torch.manual_seed(seed)
    AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                  norm_num_groups=8, sample_size=16, scaling_factor=0.5).save_pretrained(folder)
    return folder


@pytest.fixture
def vae_env(tmp_path, monkeypatch):
    """A tiny VAE in a folder, an empty Hugging Face cache with downloads nominally on, and a record of every
    load: a download (local_files_only=False) fails the test unless `allow_download` is set."""
    import huggingface_hub.constants
    folder = save_tiny_vae(tmp_path / "tiny-vae")
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    calls, state = [], {"allow_download": False}
    real = models.vae._load_autoencoder

    def load(source, subfolder, local_files_only, cache_dir):
        calls.append((source, local_files_only))
        if not local_files_only:
            assert state["allow_download"], f"sample.py tried to download {source} that the user did not ask for"
            return real(str(folder), subfolder, True, cache_dir)    # the "download"
        return real(source, subfolder, local_files_only, cache_dir)

    monkeypatch.setattr(models.vae, "_load_autoencoder", load)

    def cache_hub_copy(repo_id):
        """Put the tiny VAE into the Hugging Face cache as `repo_id` (the layout hf_hub_download reads)."""
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(COMMIT)
        shutil.copytree(folder, repo / "snapshots" / COMMIT)

    return {"folder": folder, "calls": calls, "state": state, "cache_hub_copy": cache_hub_copy}


def record(identifier, path=None):
    return {"vae": {"id": identifier, "path": None if path is None else str(path), "subfolder": None,
                    "scaling_factor": 0.5}, "latent": True}


def test_recorded_vae_folder_is_used_when_present(vae_env, capsys):
    vae = sample_script.load_decoder(None, record("someone/their-vae", vae_env["folder"]), channels=4)
    assert vae.identifier == "someone/their-vae"
    line = capsys.readouterr().out
    assert "decoding with the VAE someone/their-vae" in line and str(vae_env["folder"]) in line
    assert all(local for _, local in vae_env["calls"])


def test_recorded_hub_id_not_cached_is_not_downloaded(vae_env, tmp_path):
    with pytest.raises(MissingFile) as e:
        sample_script.load_decoder(None, record("someone/their-vae", tmp_path / "gone"), channels=4)
    message = str(e.value)
    for needle in ("someone/their-vae", str(tmp_path / "gone"), "vae=local vae.path=", "vae.id=someone/their-vae"):
        assert needle in message
    assert vae_env["calls"] and all(local for _, local in vae_env["calls"])   # looked in the cache, fetched nothing
    # A recorded id that conf/vae knows: the message names its option.
    with pytest.raises(MissingFile) as e:
        sample_script.load_decoder(None, record("stabilityai/sd-vae-ft-mse"), channels=4)
    assert "vae=sd-vae-ft-mse vae.path=" in str(e.value) and "vae=sd-vae-ft-mse " in str(e.value)
    # Official DiT checkpoints (no record): their default VAE is a suggestion too.
    with pytest.raises(MissingFile) as e:
        sample_script.load_decoder(None, {"vae": None, "latent": True}, channels=4)
    assert "stabilityai/sd-vae-ft-ema" in str(e.value) and "vae=sd-vae-ft-ema" in str(e.value)
    assert all(local for _, local in vae_env["calls"])


def test_recorded_hub_id_in_the_local_cache_is_used(vae_env, capsys):
    vae_env["cache_hub_copy"]("someone/their-vae")
    vae = sample_script.load_decoder(None, record("someone/their-vae"), channels=4)
    assert vae.identifier == "someone/their-vae" and vae.latent_channels == 4
    assert "local Hugging Face cache" in capsys.readouterr().out
    assert all(local for _, local in vae_env["calls"])


def test_vae_option_decides_and_may_download(vae_env, capsys):
    cfg = {"name": "local", "id": None, "path": str(vae_env["folder"]), "subfolder": None, "scaling_factor": None}
    vae = sample_script.load_decoder(cfg, record("someone/their-vae", "/gone"), channels=4)
    assert vae.identifier == str(Path(vae_env["folder"]).resolve())
    line = capsys.readouterr().out
    assert "vae=local" in line and "the checkpoint records someone/their-vae" in line
    # vae= naming a hub id that is not cached: the user asked for it, so it is fetched.
    vae_env["state"]["allow_download"] = True
    cfg = {"name": "sd-vae-ft-mse", "id": "someone/asked-for", "path": None, "subfolder": None, "scaling_factor": None}
    vae = sample_script.load_decoder(cfg, record("someone/their-vae"), channels=4)
    assert vae.identifier == "someone/asked-for" and ("someone/asked-for", False) in vae_env["calls"]
