"""Latent diffusion: the VAE wrapper, data=imagenet, the latent cache (extraction, guard, resume) and training /
sampling on latents, with a tiny randomly initialised AutoencoderKL saved to a temporary folder and loaded
through the real from_pretrained path. Offline: HF_HUB_OFFLINE=1, nothing is downloaded."""

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

import extract_latents
import sample as sample_script
import train as train_script
from conftest import TINY, assert_same_state, compose_config, final_state, image_folder, read_run_metrics, run_script
from data import ImageFolderDataset, LatentCacheDataset, build_dataset, center_crop_arr, check_cache, read_manifest
from data.batches import apply_flips, step_generator
from data.latents import shard_path, write_manifest
from models import DiT_models, VAE, build_vae

IMAGE_SIZE, LATENT_SIZE, SCALING = 16, 8, 0.5   # the tiny VAE halves once; its config's scaling factor is 0.5
OFFLINE = {"HF_HUB_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


def save_tiny_vae(folder, seed):
    """A 2x-downsampling AutoencoderKL with 4 latent channels, written with save_pretrained."""
    torch.manual_seed(seed)
    AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                  norm_num_groups=8, sample_size=IMAGE_SIZE, scaling_factor=SCALING).save_pretrained(folder)
    return folder


def make_image_folder(root, classes=2, per_class=3):
    """Random RGB images of a few non-square sizes, one sub-folder per class."""
    rng = np.random.default_rng(0)
    return image_folder(root, classes, per_class,
                        image=lambda c, i: rng.integers(0, 256, (20 + 4 * i, 24 - 2 * c, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny VAE, a second one with other weights, an image folder, and a latent cache made from them."""
    root = tmp_path_factory.mktemp("latents")
    vae_dir = save_tiny_vae(root / "vae", seed=0)
    other_vae_dir = save_tiny_vae(root / "other_vae", seed=1)
    images = make_image_folder(root / "images")
    cache = root / "cache"
    # 6 images in shards of 4 with batches of 3: a batch ends one shard and starts the next.
    extract_latents.extract(compose_config("extract", extract_overrides(vae_dir, images, cache)))
    return {"root": root, "vae": vae_dir, "other_vae": other_vae_dir, "images": images, "cache": cache}


def extract_overrides(vae_dir, images, out):
    return [f"data.path={images}", f"data.image_size={IMAGE_SIZE}", "data.num_workers=0", "vae=local",
            f"vae.path={vae_dir}", f"out={out}", "shard_size=4", "batch_size=3", "device=cpu"]


def latent_overrides(files, run_dir, steps=4, cache=None):
    return [*TINY, "data=latents", f"data.path={cache or files['cache']}", f"data.image_size={IMAGE_SIZE}",
            "data.num_workers=0", "vae=local", f"vae.path={files['vae']}", "model=DiT-T-2", "train.batch_size=4",
            f"train.steps={steps}", f"run_dir={run_dir}"]


def without(overrides, *keys):
    """The overrides minus those that set one of `keys` (a group name also drops the group's fields)."""
    return [o for o in overrides if not any(o.split("=")[0] == k or o.startswith(k + ".") for k in keys)]






# ------------------------------------------------------------------------------------------------------------
# The VAE wrapper
# ------------------------------------------------------------------------------------------------------------

def test_vae_loads_from_a_local_folder(files):
    vae = VAE.from_pretrained(files["vae"])
    assert vae.identifier == str(files["vae"].resolve())
    assert (vae.latent_channels, vae.downsample, vae.image_channels) == (4, 2, 3)
    assert vae.scaling_factor == SCALING                                   # from the VAE's config
    assert VAE.from_pretrained(files["vae"], scaling_factor=0.25).scaling_factor == 0.25
    assert not any(p.requires_grad for p in vae.parameters())
    assert all(p.dtype == torch.float32 for p in vae.parameters())
    # The config route: a hub VAE copied to a folder keeps its hub id as identity.
    named = build_vae(name="sd-vae-ft-ema", id="stabilityai/sd-vae-ft-ema", path=str(files["vae"]))
    assert named.identifier == "stabilityai/sd-vae-ft-ema"
    assert build_vae(name="none") is None


def test_encode_decode_shapes_scaling_and_fp32(files):
    vae = VAE.from_pretrained(files["vae"])
    autoencoder = AutoencoderKL.from_pretrained(files["vae"])
    x = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1
    with torch.no_grad():
        dist = autoencoder.encode(x).latent_dist
    z = vae.encode(x, sample=False)
    assert z.shape == (3, 4, LATENT_SIZE, LATENT_SIZE)
    torch.testing.assert_close(z, dist.mean * SCALING)                     # the factor is applied once, here
    moments = vae.encode_moments(x)
    torch.testing.assert_close(moments, torch.cat([dist.mean, dist.logvar], 1))
    eps = torch.randn(3, 4, LATENT_SIZE, LATENT_SIZE)
    torch.testing.assert_close(vae.latents(moments, eps), (dist.mean + dist.std * eps) * SCALING)
    drawn = [vae.encode(x, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(drawn[0], drawn[1]) and not torch.allclose(drawn[0], z)
    images = vae.decode(z)
    assert images.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE) and images.abs().max() <= 1
    with torch.no_grad():
        torch.testing.assert_close(images, autoencoder.decode(z / SCALING).sample.clamp(-1, 1))
    # fp32 and no gradients inside a bf16 autocast training step.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_bf16, images_bf16 = vae.encode(x.requires_grad_(), sample=False), vae.decode(z)
    assert z_bf16.dtype == images_bf16.dtype == torch.float32 and not z_bf16.requires_grad
    torch.testing.assert_close(z_bf16, z)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")  # diffusers -> hub
def test_missing_vae_offline_names_the_id_the_command_and_the_setting(tmp_path):
    for kwargs in ({"local_files_only": True}, {}):   # {}: downloads are off through HF_HUB_OFFLINE=1
        with pytest.raises(FileNotFoundError) as error:
            VAE.from_pretrained("stabilityai/sd-vae-ft-ema", cache_dir=tmp_path, **kwargs)
        message = str(error.value)
        assert "'stabilityai/sd-vae-ft-ema'" in message
        assert "download stabilityai/sd-vae-ft-ema --local-dir" in message and "vae.path=" in message
    with pytest.raises(FileNotFoundError, match="does not exist; vae.path must be a folder"):
        VAE.from_pretrained(tmp_path / "absent")


def test_vae_configs():
    assert compose_config().vae.name == "none"                             # the digits default: pixel space
    for name in ("sd-vae-ft-ema", "sd-vae-ft-mse"):
        cfg = compose_config(overrides=[f"vae={name}"])
        assert cfg.vae.id == f"stabilityai/{name}" and cfg.vae.path is None and cfg.vae.scaling_factor is None


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------

def test_imagenet_data_is_an_unflipped_centre_cropped_image_folder(files):
    cfg = compose_config(overrides=["data=imagenet", f"data.path={files['images']}"])
    assert cfg.data.image_size == 256 and cfg.data.random_flip
    dataset = build_dataset(**{**cfg.data, "image_size": IMAGE_SIZE})
    assert isinstance(dataset, ImageFolderDataset) and dataset.num_classes == 2 and len(dataset) == 6
    x, y = dataset[4]
    expected = center_crop_arr(Image.open(dataset.samples[4][0]).convert("RGB"), IMAGE_SIZE)
    assert x.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and y == 1
    torch.testing.assert_close(x, torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 127.5 - 1)


def test_cache_round_trip_holds_both_flips(files):
    vae = VAE.from_pretrained(files["vae"])
    images = ImageFolderDataset(files["images"], IMAGE_SIZE)
    dataset = build_dataset(name="latents", path=files["cache"])
    manifest = read_manifest(files["cache"])
    assert {k: manifest[k] for k in ("vae", "scaling_factor", "image_size", "crop", "num_images", "num_classes",
                                     "latent_channels", "latent_size", "num_shards", "complete")} == {
        "vae": vae.identifier, "scaling_factor": SCALING, "image_size": IMAGE_SIZE, "crop": "adm-center",
        "num_images": 6, "num_classes": 2, "latent_channels": 4, "latent_size": LATENT_SIZE, "num_shards": 2,
        "complete": True}
    assert manifest["classes"] == images.classes
    assert (dataset.num_classes, dataset.channels, dataset.image_size, len(dataset)) == (2, 4, LATENT_SIZE, 6)
    for i in range(len(images)):
        x, y = images[i]
        moments, label = dataset[i]
        assert moments.shape == (2, 8, LATENT_SIZE, LATENT_SIZE) and moments.dtype == torch.float32 and label == y
        expected = vae.encode_moments(torch.stack([x, x.flip(-1)]))
        torch.testing.assert_close(moments, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(moments[0], moments[1])                  # the mirror image is its own entry
    # Memory-mapped and opened lazily: nothing of the shards travels to DataLoader workers.
    assert isinstance(dataset.shard(0), np.memmap)
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._shards == {} and len(pickle.dumps(dataset)) < 20_000
    torch.testing.assert_close(clone[5][0], dataset[5][0])


def test_posterior_samples_and_flips_have_the_right_statistics(files):
    dataset = LatentCacheDataset(files["cache"])
    vae = VAE.from_pretrained(files["vae"])
    moments = dataset[0][0]                                                 # (2, 2C, h, w)
    n = 4000
    gen = step_generator(0, 0, torch.device("cpu"))
    flip = torch.rand(n, generator=gen) < 0.5
    eps = torch.randn(n, 4, LATENT_SIZE, LATENT_SIZE, generator=gen)
    z = vae.latents(apply_flips(moments.expand(n, -1, -1, -1, -1), flip, cached=True), eps)
    assert abs(flip.float().mean() - 0.5) < 0.05
    for f in (0, 1):
        mean, logvar = moments[f].chunk(2)
        picked = z[flip == bool(f)]
        std = torch.exp(0.5 * logvar) * SCALING
        assert ((picked.mean(0) - mean * SCALING).abs() < 5 * std / len(picked) ** 0.5).all()
        torch.testing.assert_close(picked.std(0), std, rtol=0.1, atol=0)


# ------------------------------------------------------------------------------------------------------------
# The cache guard and resumed extraction
# ------------------------------------------------------------------------------------------------------------

def test_a_cache_that_disagrees_with_the_config_is_refused(files, tmp_path):
    base = latent_overrides(files, tmp_path / "run")
    cases = {f"vae.path={files['other_vae']}": "made with the VAE",
             "vae.scaling_factor=0.25": "its scaling factor is 0.5",
             "data.image_size=32": "made at 16x16 but data.image_size=32",
             "vae=none": "pixel space"}
    for override, message in cases.items():
        key = override.split("=")[0]
        overrides = without(base, key) + [override]
        with pytest.raises(ValueError, match=message):
            train_script.train(compose_config(overrides=overrides))
    manifest = read_manifest(files["cache"])
    with pytest.raises(ValueError, match="incomplete"):
        check_cache({**manifest, "complete": False}, vae=manifest["vae"], scaling_factor=SCALING, image_size=None)
    # Extraction refuses to add to a cache made with another VAE.
    with pytest.raises(ValueError, match="made with other settings"):
        extract_latents.extract(compose_config("extract", extract_overrides(files["other_vae"], files["images"],
                                                                            files["cache"])))


def test_extraction_resumes_and_keeps_finished_shards(files, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(files["cache"], cache)
    # An interrupted run: shard 1 never renamed into place (a temporary file left), manifest not complete.
    original = np.load(shard_path(cache, 1))
    shard_path(cache, 1).unlink()
    (cache / f".{shard_path(cache, 1).name}.tmp999").write_bytes(b"partial")
    write_manifest(cache, {**read_manifest(cache), "complete": False})
    finished = shard_path(cache, 0).stat().st_mtime_ns
    with pytest.raises(ValueError, match="incomplete"):
        train_script.train(compose_config(overrides=latent_overrides(files, tmp_path / "run", cache=cache)))
    extract_latents.extract(compose_config("extract", extract_overrides(files["vae"], files["images"], cache)))
    assert shard_path(cache, 0).stat().st_mtime_ns == finished               # skipped, not rewritten
    np.testing.assert_array_equal(np.load(shard_path(cache, 1)), original)
    assert read_manifest(cache)["complete"] and not list(cache.glob(".*tmp*"))


# ------------------------------------------------------------------------------------------------------------
# Training and sampling on latents
# ------------------------------------------------------------------------------------------------------------

def test_latent_training_resumes_exactly_and_samples_decode_to_images(files, tmp_path):
    train_script.train(compose_config(overrides=latent_overrides(files, tmp_path / "ref", steps=4)))
    train_script.train(compose_config(overrides=latent_overrides(files, tmp_path / "split", steps=2)))
    train_script.train(compose_config(overrides=latent_overrides(files, tmp_path / "split", steps=4)))
    ref = final_state(tmp_path / "ref")
    assert_same_state(ref, final_state(tmp_path / "split"))
    args = ref["model_args"]
    assert (args["in_channels"], args["input_size"], args["num_classes"]) == (4, LATENT_SIZE, 2)
    assert args["vae"] == {"id": str(files["vae"].resolve()), "path": str(files["vae"]), "subfolder": None,
                           "scaling_factor": SCALING}
    assert Image.open(tmp_path / "ref" / "samples" / "0000004.png").size[0] > 0   # a decoded grid
    cfg = compose_config("sample", [f"ckpt={tmp_path / 'ref'}", "num_samples=3", "batch_size=2", "steps=2",
                                    f"out={tmp_path}/s", "device=cpu"])
    out = sample_script.run(cfg)
    samples = np.load(out / "samples.npz")
    assert samples["arr_0"].dtype == np.uint8 and samples["arr_0"].shape == (3, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert json.loads((out / "samples.json").read_text())["vae"] == str(files["vae"].resolve())


def test_training_from_the_cache_matches_encoding_on_the_fly(files, tmp_path):
    cached = latent_overrides(files, tmp_path / "cached", steps=2)
    on_the_fly = without(cached, "data", "run_dir") + [
        "data=imagenet", f"data.path={files['images']}", f"data.image_size={IMAGE_SIZE}", "data.num_workers=0",
        f"run_dir={tmp_path}/fly"]
    train_script.train(compose_config(overrides=cached))
    train_script.train(compose_config(overrides=on_the_fly))
    a, b = final_state(tmp_path / "cached"), final_state(tmp_path / "fly")
    assert a["model_args"] == b["model_args"]
    for name in a["model"]:  # same flips, same posterior samples, same noise: the same training
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=1e-4, atol=1e-5)


def test_sampling_an_official_latent_checkpoint_with_a_vae_override(files, tmp_path):
    torch.manual_seed(0)
    # Official checkpoints come in the size table's shapes (sample.py looks the head count up there).
    model = DiT_models["DiT-Mini/2"](input_size=LATENT_SIZE, in_channels=4, num_classes=3)
    torch.save(model.state_dict(), tmp_path / "official.pt")              # the official format: a bare state_dict
    base = [f"ckpt={tmp_path / 'official.pt'}", "num_samples=2", "steps=2", f"out={tmp_path}/s", "device=cpu"]
    out = sample_script.run(compose_config("sample", [*base, "vae=local", f"vae.path={files['vae']}"]))
    assert np.load(out / "samples.npz")["arr_0"].shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    with pytest.raises(ValueError, match="does not fit a latent-space model"):
        sample_script.run(compose_config("sample", [*base, "vae=none"]))


@pytest.mark.slow
@pytest.mark.distributed
def test_extraction_under_torchrun_matches_one_process(files, tmp_path):
    run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541", "extract_latents.py",
                *extract_overrides(files["vae"], files["images"], tmp_path / "ddp"), "shard_size=2"],
               env={"OMP_NUM_THREADS": "1", **OFFLINE})
    assert read_manifest(tmp_path / "ddp")["complete"]
    single, ddp = LatentCacheDataset(files["cache"]), LatentCacheDataset(tmp_path / "ddp")
    assert ddp.manifest["num_shards"] == 3
    for i in range(len(single)):
        torch.testing.assert_close(ddp[i][0], single[i][0], rtol=1e-5, atol=1e-5)
        assert ddp[i][1] == single[i][1]


# ------------------------------------------------------------------------------------------------------------
# The paper's recipe
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("experiment, size", [("imagenet256", 256), ("imagenet512", 512)])
def test_imagenet_experiments_state_the_papers_recipe(experiment, size):
    for data in ("imagenet", "latents"):
        cfg = compose_config(overrides=[f"experiment={experiment}", f"data={data}", "data.path=/nowhere"])
        assert cfg.model.name == "DiT-XL/2" and cfg.data.name == data and cfg.data.image_size == size
        assert cfg.data.random_flip and cfg.vae.id == "stabilityai/sd-vae-ft-ema"
        assert cfg.train.batch_size == 256 and cfg.ema.decay == 0.9999
        assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 0 and cfg.optim.warmup_steps == 0
        assert cfg.optim.cooldown_fraction == 0  # constant, not the digits default's cool-down
        assert cfg.diffusion.noise_schedule == "linear" and cfg.diffusion.learn_sigma


# ------------------------------------------------------------------------------------------------------------
# Latent normalisation (vae.normalize=true, LightningDiT's channel-wise mean / std)
# ------------------------------------------------------------------------------------------------------------

def all_cache_moments(cache):
    dataset = LatentCacheDataset(cache)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])          # (n, 2, 2C, h, w)


def test_channel_stats_are_the_moments_of_the_scaled_latents():
    from models.vae import channel_stats, moment_sums
    g = torch.Generator().manual_seed(0)
    moments = torch.cat([torch.randn(50, 3, 4, 4, generator=g) * 2 + 1, torch.randn(50, 3, 4, 4, generator=g) - 1], 1)
    mean, std = channel_stats([moment_sums(moments[:20]), moment_sums(moments[20:])], 0.5)   # sums combine
    mu, logvar = moments.double().chunk(2, dim=1)
    z = 0.5 * (mu[None] + (0.5 * logvar).exp()[None] * torch.randn(2000, *mu.shape, generator=g, dtype=torch.float64))
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), z.mean((0, 1, 3, 4)), rtol=0, atol=0.01)
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), z.std((0, 1, 3, 4)), rtol=0.01, atol=0)


def test_the_cache_records_the_channel_stats_of_its_latents(files):
    from models.vae import channel_stats, moment_sums
    manifest = read_manifest(files["cache"])
    mean, std = channel_stats(moment_sums(all_cache_moments(files["cache"])), SCALING)
    torch.testing.assert_close(torch.tensor(manifest["channel_mean"]), torch.tensor(mean), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.tensor(manifest["channel_std"]), torch.tensor(std), rtol=1e-6, atol=1e-7)
    vae = VAE.from_pretrained(files["vae"]).set_channel_stats(mean, std)
    moments = all_cache_moments(files["cache"]).flatten(0, 1).repeat(200, 1, 1, 1)
    z = vae.latents(moments, torch.randn(len(moments), 4, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(4), rtol=0, atol=0.02)         # zero mean, unit std
    torch.testing.assert_close(z.std((0, 2, 3)), torch.ones(4), rtol=0.02, atol=0)


def test_decoding_undoes_the_normalisation(files):
    plain = VAE.from_pretrained(files["vae"])
    normed = VAE.from_pretrained(files["vae"]).set_channel_stats([0.1, -0.2, 0.3, 0.0], [0.5, 2.0, 1.0, 0.7])
    moments = all_cache_moments(files["cache"])[:2, 0]
    assert not torch.allclose(plain.latents(moments), normed.latents(moments))
    torch.testing.assert_close(normed.decode(normed.latents(moments)), plain.decode(plain.latents(moments)),
                               rtol=1e-4, atol=1e-5)


def test_a_cache_without_stats_is_refused_and_re_extracting_adds_them(files, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(files["cache"], cache)
    manifest = read_manifest(cache)
    for path in cache.glob("*.stats.json"):
        path.unlink()
    write_manifest(cache, {k: v for k, v in manifest.items() if k not in ("channel_mean", "channel_std")})
    cfg = compose_config(overrides=[*latent_overrides(files, tmp_path / "run", cache=cache), "vae.normalize=true"])
    with pytest.raises(ValueError, match="has no channel statistics.*re-run the extract_latents.py command"):
        train_script.train(cfg)
    extract_latents.extract(compose_config("extract", extract_overrides(files["vae"], files["images"], cache)))
    again = read_manifest(cache)
    assert again["channel_mean"] == pytest.approx(manifest["channel_mean"], rel=1e-6)
    assert again["channel_std"] == pytest.approx(manifest["channel_std"], rel=1e-6)


@pytest.mark.slow   # ~4 s
def test_normalised_training_from_the_cache_and_on_the_fly_agree_and_sample_py_decodes(files, tmp_path):
    cached = [*latent_overrides(files, tmp_path / "cached", steps=2), "vae.normalize=true"]
    on_the_fly = without(cached, "data", "run_dir") + [
        "data=imagenet", f"data.path={files['images']}", f"data.image_size={IMAGE_SIZE}", "data.num_workers=0",
        f"run_dir={tmp_path}/fly"]
    train_script.train(compose_config(overrides=cached))
    train_script.train(compose_config(overrides=on_the_fly))   # stats_images >= 6: every image and mirror measured
    a, b = final_state(tmp_path / "cached")["model_args"]["vae"], final_state(tmp_path / "fly")["model_args"]["vae"]
    manifest = read_manifest(files["cache"])
    assert a["channel_mean"] == pytest.approx(manifest["channel_mean"], rel=1e-6)
    assert b["channel_mean"] == pytest.approx(a["channel_mean"], rel=1e-4, abs=1e-6)
    assert b["channel_std"] == pytest.approx(a["channel_std"], rel=1e-4)
    with pytest.raises(ValueError, match="vae="):          # resuming without the normalisation is refused
        train_script.train(compose_config(overrides=without(cached, "vae.normalize")))
    info = {"vae": a, "latent": True}
    decoder = sample_script.load_decoder(None, info, channels=4)
    assert decoder.channel_mean.flatten().tolist() == pytest.approx(a["channel_mean"])
    out = sample_script.run(compose_config("sample", [f"ckpt={tmp_path / 'cached'}", "num_samples=2", "steps=2",
                                                      f"out={tmp_path}/s", "device=cpu"]))
    assert np.load(out / "samples.npz")["arr_0"].shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)


# ------------------------------------------------------------------------------------------------------------
# REPA encoder features stored in the cache (extract_latents.py repa.encoder=...)
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def repa_cache(files):
    """Random-weight DINOv2 ViT-S/14 weights (timm's layout) and a cache made with its features."""
    import timm
    torch.manual_seed(0)
    weights = files["root"] / "dinov2_vits14_random.pth"
    torch.save(timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, num_classes=0)
               .state_dict(), weights)
    cache = files["root"] / "repa_cache"
    extract_latents.extract(compose_config("extract", [*extract_overrides(files["vae"], files["images"], cache),
                                                       "repa.encoder=dinov2-vit-s", f"repa.weights={weights}"]))
    return {"weights": weights, "cache": cache}


REPA_S = ["repa.encoder=dinov2-vit-s", "repa.depth=1", "repa.projector_dim=32"]


def test_the_cache_stores_the_encoders_features_of_both_flips(files, repa_cache):
    from diffusion.repa import build_encoder
    manifest = read_manifest(repa_cache["cache"])
    assert manifest["repa"] == {"encoder": "dinov2-vit-s", "tokens": 256, "width": 384}
    dataset = LatentCacheDataset(repa_cache["cache"])
    dataset.with_repa_features = True
    encoder = build_encoder("dinov2-vit-s", weights=str(repa_cache["weights"]), resolution=IMAGE_SIZE)
    images = ImageFolderDataset(files["images"], IMAGE_SIZE)
    for i in (0, 5):
        moments, label, feats = dataset[i]
        x = images[i][0]
        with torch.no_grad():
            expected = encoder(torch.stack([x, x.flip(-1)]))
        assert feats.shape == (2, 256, 384) and label == images[i][1]
        torch.testing.assert_close(feats, expected.half().float(), rtol=0, atol=0)
        torch.testing.assert_close(moments, all_cache_moments(files["cache"])[i])   # the latents are unchanged


@pytest.mark.slow   # ~4.5 s
def test_repa_from_stored_features_trains_as_repa_on_the_fly(files, repa_cache, tmp_path):
    cached = [*latent_overrides(files, tmp_path / "cached", steps=2, cache=repa_cache["cache"]), *REPA_S]
    on_the_fly = without(cached, "data", "run_dir") + [
        "data=imagenet", f"data.path={files['images']}", f"data.image_size={IMAGE_SIZE}", "data.num_workers=0",
        f"repa.weights={repa_cache['weights']}", f"run_dir={tmp_path}/fly"]
    with pytest.warns(UserWarning, match="16x16 token grid and the network 4x4"):
        train_script.train(compose_config(overrides=cached))      # no encoder loaded: no weights given
    train_script.train(compose_config(overrides=on_the_fly))
    # The same targets up to their float16 storage.
    for a, b in zip(read_run_metrics(tmp_path / "cached"), read_run_metrics(tmp_path / "fly")):
        assert a["repa_loss"] == pytest.approx(b["repa_loss"], rel=1e-3)
        assert a["objective_loss"] == pytest.approx(b["objective_loss"], rel=1e-4)
    a, b = final_state(tmp_path / "cached"), final_state(tmp_path / "fly")
    for key in ("model", "ema"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-3, atol=1e-5)
    for name in a["repa"]["projector"]:
        torch.testing.assert_close(a["repa"]["projector"][name], b["repa"]["projector"][name], rtol=1e-3, atol=1e-5)


def test_repa_on_a_cache_without_its_features_is_refused(files, tmp_path):
    cfg = compose_config(overrides=[*latent_overrides(files, tmp_path / "run"), *REPA_S])
    with pytest.raises(ValueError, match="needs the encoder's features in the latent cache .* holds none"):
        train_script.train(cfg)
