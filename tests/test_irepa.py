"""iREPA as options of REPA (repa.projector=conv, repa.spatial_norm=true): parity with the official
End2End-Diffusion/iREPA code, the closed forms of both changes, and training and resuming with them."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import train as train_script
from conftest import (
    TINY,
    assert_same_state,
    compose_config,
    final_state,
    load_reference_script,
    read_run_metrics,
    tiny_digits_dit,
)
from diffusion.repa import REPA, ConvProjector, alignment_loss, spatial_normalize
from utils.errors import ConfigError

IREPA_RUN = [*TINY, "repa.encoder=digits", "repa.depth=2", "repa.projector=conv", "repa.spatial_norm=true"]


def test_conv_projector_and_spatial_norm_equal_the_official_irepa():
    """Against tests/data/irepa_reference.pt (tests/reference/make_irepa_reference.py, from End2End-Diffusion/iREPA's
    ldm/: ProjectionLayer, SpatialNormalization, SILoss); with IREPA_OFFICIAL_PATH set, the official code runs live."""
    ref = load_reference_script("make_irepa_reference")
    stored = torch.load(Path(__file__).parent / "data" / "irepa_reference.pt", weights_only=True)
    if os.environ.get("IREPA_OFFICIAL_PATH"):
        stored = ref.make_reference(*ref.load_official(os.environ["IREPA_OFFICIAL_PATH"]))
    ours = ConvProjector(ref.HIDDEN, ref.Z_DIM, ref.GRID, ref.KERNEL, seed=ref.SEED)
    # Our seeded init draws what PyTorch's default Conv2d init draws after torch.manual_seed(seed): the official one.
    assert ours.state_dict().keys() == stored["weights"].keys()
    assert all(torch.equal(value, stored["weights"][name]) for name, value in ours.state_dict().items())
    ours.load_state_dict(stored["weights"], strict=True)
    with torch.no_grad():
        projected = ours(stored["h"])
    torch.testing.assert_close(projected, stored["projected"], rtol=1e-5, atol=1e-6)
    z_normalized = spatial_normalize(stored["z"], ref.GAMMA)
    torch.testing.assert_close(z_normalized, stored["z_normalized"], rtol=1e-5, atol=1e-6)
    for target, key in ((z_normalized, "proj_loss"), (stored["z"], "proj_loss_raw")):
        loss = alignment_loss(projected, target).mean()             # train.py's mean over the batch; coeff 1.0
        torch.testing.assert_close(loss, stored[key].float(), rtol=1e-5, atol=1e-5)


def test_spatial_norm_is_the_z_score_over_each_images_tokens():
    z = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(0)) + 3.0
    a = z.double().numpy()
    for gamma in (0.6, 1.0):
        expected = (a - gamma * a.mean(1, keepdims=True)) / (a.std(1, ddof=1, keepdims=True) + 1e-6)
        np.testing.assert_allclose(spatial_normalize(z, gamma).numpy(), expected, rtol=1e-5, atol=1e-6)
    out = spatial_normalize(z, 1.0)                                # gamma 1: zero mean, unit std per channel
    assert out.mean(1).abs().max() < 1e-5 and (out.std(1) - 1).abs().max() < 1e-5


def test_the_conv_projector_maps_each_token_from_its_grid_neighbours():
    grid, g = (2, 3), torch.Generator().manual_seed(0)                 # a non-square grid, laid out row-major
    h = torch.randn(2, 6, 4, generator=g)
    pointwise = ConvProjector(4, 5, grid, kernel_size=1)               # 1x1: a linear map of each token
    w, b = pointwise.projection_layer.weight[:, :, 0, 0], pointwise.projection_layer.bias
    torch.testing.assert_close(pointwise(h), h @ w.T + b)
    conv = ConvProjector(4, 5, grid, kernel_size=3)
    moved = h.clone()
    moved[:, 2] += 1.0                                                 # token (row 0, col 2)
    changed = (conv(moved) - conv(h)).abs().amax(dim=(0, 2)) > 0
    assert changed.tolist() == [False, True, True, False, True, True]  # its 3x3 neighbourhood: columns 1 and 2
    with pytest.raises(ConfigError, match="odd kernel"):
        ConvProjector(4, 5, grid, kernel_size=2)


def test_repa_with_irepa_options_projects_by_conv_and_normalises_its_targets():
    torch.manual_seed(0)
    model = tiny_digits_dit(depth=3, learn_sigma=False)
    repa = REPA(model, "digits", depth=2, projector="conv", spatial_norm=True, spatial_norm_gamma=0.8)
    assert isinstance(repa.projector, ConvProjector) and repa.projector.grid == (4, 4)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(repa.encode(x), spatial_normalize(repa.encoder(x), 0.8))
    stored = torch.stack([repa.encoder(x), repa.encoder(x.flip(-1))], 1).half()  # a cache keeps them raw
    flip = torch.tensor([True, False, True, False])
    expected = spatial_normalize(torch.where(flip[:, None, None], stored[:, 1], stored[:, 0]), 0.8)
    torch.testing.assert_close(repa.targets(x, stored, flip), expected)
    with pytest.raises(ConfigError, match="repa.projector='linear'"):
        REPA(model, "digits", depth=2, projector="linear")


@pytest.mark.slow   # two training runs: over 10 s on 2 cores
def test_training_with_irepa_options_resumes_exactly_and_saves_the_conv_projector(tmp_path):
    train_script.train(compose_config(overrides=[*IREPA_RUN, f"run_dir={tmp_path}/whole"]))
    train_script.train(compose_config(overrides=[*IREPA_RUN, "train.steps=2", f"run_dir={tmp_path}/split"]))
    train_script.train(compose_config(overrides=[*IREPA_RUN, f"run_dir={tmp_path}/split"]))
    whole, split = final_state(tmp_path / "whole"), final_state(tmp_path / "split")
    assert_same_state(whole, split)
    assert whole["repa"]["projector"].keys() == {"projection_layer.weight", "projection_layer.bias"}
    weight = whole["repa"]["projector"]["projection_layer.weight"]
    assert weight.shape[0] == 128 and weight.shape[2:] == (3, 3)      # digits width out, 3x3 over the grid
    for name, value in whole["repa"]["projector"].items():
        assert torch.equal(value, split["repa"]["projector"][name]), name
    for i, state in whole["repa"]["opt"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, split["repa"]["opt"]["state"][i][name]), f"projector opt {i}.{name}"
    rows = [r for r in read_run_metrics(tmp_path / "whole") if "loss" in r]
    assert rows and all(-1 <= r["repa_loss"] <= 1 for r in rows)
    with pytest.raises(ConfigError, match="repa="):                   # the projector names the run
        train_script.train(compose_config(overrides=[*IREPA_RUN, "repa.projector=mlp", f"run_dir={tmp_path}/split"]))
