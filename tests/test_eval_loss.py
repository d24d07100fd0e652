"""The evaluation loss (diffusion/eval_loss.py): deterministic for given weights, different for other weights, the same
after a resume and on 1 and 2 processes, equal to its closed form for networks whose prediction is known, with the
time grid at the training density's quantiles and a bootstrap standard error that numpy reproduces."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.special import expit
from scipy.stats import norm

import train as train_script
from conftest import ROOT, TINY, compose_config, read_run_metrics, run_script
from data import DigitsDataset
from diffusion import build_objective
from diffusion.eval_loss import (BOOTSTRAP_RESAMPLES, bootstrap_indices, bootstrap_se, build_eval_loss,
                                 image_noise, time_grid)
from models import create_model
from utils.errors import ConfigError

SHAPE = (1, 8, 8)


def _evaluator(objective, num_images=24, times=4, batch_size=5, **kwargs):
    return build_eval_loss(objective, DigitsDataset(), None, shape=SHAPE, data_name="digits", every=1,
                           num_images=num_images, times=times, batch_size=batch_size, **kwargs)


def _model(objective, seed):
    torch.manual_seed(seed)
    model = create_model("DiT-Mini/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=objective.learn_sigma)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)   # zero-init outputs would not tell models apart
    return model


class Known(torch.nn.Module):
    """A network whose prediction is known: zeros, or its input x_t."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x, t, y):
        return torch.zeros_like(x) if self.kind == "zeros" else x.clone()


@pytest.mark.parametrize("diffusion", [{"objective": "ddpm"}, {"objective": "flow", "time_sampling": "logit_normal"}])
def test_the_same_weights_give_the_same_number_and_other_weights_another(diffusion):
    objective = build_objective(diffusion)
    evaluator = _evaluator(objective)
    model = _model(objective, 0)
    first, again = evaluator.losses(model), evaluator.losses(model)
    assert first.shape == (24, 4) and np.isfinite(first).all()
    assert np.array_equal(first, again) and evaluator(model) == evaluator(model)
    assert model.training   # evaluated in eval mode, handed back as it was
    other = evaluator(_model(objective, 1))
    assert other[0] != evaluator(model)[0]
    assert evaluator(model)[1] > 0


def test_the_time_grid_is_the_training_densitys_quantiles():
    t, w = time_grid(build_objective({"objective": "ddpm"}), 4)
    assert t.tolist() == [125, 375, 625, 875] and t.dtype == torch.long and np.allclose(w.numpy(), 0.25)
    mid = (np.arange(5) + 0.5) / 5
    t, w = time_grid(build_objective({"objective": "flow", "time_sampling": "logit_normal", "time_mean": 0.5,
                                      "time_std": 1.5}), 5)
    np.testing.assert_allclose(t.numpy(), expit(0.5 + 1.5 * norm.ppf(mid)), rtol=1e-6)
    t, _ = time_grid(build_objective({"objective": "flow", "time_sampling": "uniform"}), 5)
    np.testing.assert_allclose(t.numpy(), mid, rtol=1e-6)
    with pytest.raises(ConfigError, match="eval.times"):
        time_grid(build_objective({"objective": "flow"}), 0)


@pytest.mark.parametrize("kind", ["zeros", "identity"])
def test_a_known_prediction_gives_the_closed_form(kind):
    """Linear flow, velocity prediction: x_t = t x + (1 - t) eps, target u = x - eps. A zero network's loss is
    mean((x - eps)^2); one returning x_t has loss mean(((t - 1) x + (2 - t) eps)^2)."""
    objective = build_objective({"objective": "flow", "time_sampling": "logit_normal"})
    evaluator = _evaluator(objective, num_images=10, times=3, batch_size=4)
    t = expit(norm.ppf((np.arange(3) + 0.5) / 3))
    data = DigitsDataset()
    expected = np.zeros((10, 3))
    for pos, index in enumerate(evaluator.indices):
        x = data.images[index].double().numpy()
        noise = image_noise(pos, 3, SHAPE)[0].double().numpy()
        for i in range(3):
            residual = x - noise[i] if kind == "zeros" else (t[i] - 1) * x + (2 - t[i]) * noise[i]
            expected[pos, i] = np.mean(residual ** 2)
    np.testing.assert_allclose(evaluator.losses(Known(kind)), expected, rtol=1e-5)
    mean, se = evaluator(Known(kind))
    assert mean == pytest.approx(expected.mean(), rel=1e-5)
    assert se == pytest.approx(bootstrap_se(expected.mean(axis=1)), rel=1e-4)


def test_the_bootstrap_se_is_numpys_with_the_same_resamples():
    values = np.random.default_rng(5).normal(size=37)
    idx = np.random.default_rng(0).integers(0, 37, size=(BOOTSTRAP_RESAMPLES, 37))
    assert np.array_equal(bootstrap_indices(37), idx)
    direct = np.std([values[row].mean() for row in idx], ddof=1)
    assert bootstrap_se(values) == pytest.approx(direct, rel=1e-12)
    assert 0.5 < bootstrap_se(values) / (values.std(ddof=1) / math.sqrt(37)) < 1.5   # near the textbook SE


def test_the_noise_of_an_image_depends_on_the_image_only():
    a, b = image_noise(3, 4, SHAPE), image_noise(3, 4, SHAPE)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], image_noise(4, 4, SHAPE)[0])
    torch.manual_seed(123)   # the global RNG (the training's) plays no part
    assert torch.equal(image_noise(3, 4, SHAPE)[0], a[0])


def test_the_digits_use_the_judges_heldout_split_and_other_data_need_a_path():
    objective = build_objective({"objective": "flow"})
    evaluator = _evaluator(objective, num_images=None)
    assert len(evaluator.indices) == 540 and set(evaluator.indices) == set(DigitsDataset().heldout_indices())
    assert build_eval_loss(objective, DigitsDataset(), None, shape=SHAPE, data_name="digits", every=0) is None
    with pytest.raises(ConfigError, match="eval.path"):
        build_eval_loss(objective, object(), None, shape=(4, 32, 32), data_name="imagenet", every=100)


def test_a_resumed_run_logs_the_same_eval_loss_as_an_uninterrupted_one(tmp_path):
    common = [*TINY, "eval.every=2", "eval.num_images=16", "eval.times=3", "eval.batch_size=8"]
    train_script.train(compose_config(overrides=[*common, f"run_dir={tmp_path}/whole"]))
    train_script.train(compose_config(overrides=[*common, "train.steps=2", f"run_dir={tmp_path}/resumed"]))
    train_script.train(compose_config(overrides=[*common, f"run_dir={tmp_path}/resumed"]))
    keys = ("eval_loss", "eval_loss_se", "eval_loss_ema", "eval_loss_ema_se")
    rows = lambda run: {r["step"]: tuple(r[k] for k in keys) for r in read_run_metrics(tmp_path / run)
                        if "eval_loss" in r}
    whole = rows("whole")
    assert whole.keys() == {2, 4} and rows("resumed") == whole
    assert all(math.isfinite(v) for row in whole.values() for v in row)


WORKER = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from data import DigitsDataset
from diffusion import build_objective
from diffusion.eval_loss import build_eval_loss
from models import create_model
dist.init_process_group("gloo")
objective = build_objective({{"objective": "flow", "time_sampling": "logit_normal"}})
model = create_model("DiT-Mini/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False)
model.load_state_dict(torch.load({weights!r}, weights_only=True))
evaluator = build_eval_loss(objective, DigitsDataset(), None, shape=(1, 8, 8), data_name="digits", every=1,
                            num_images=23, times=3, batch_size=4, rank=dist.get_rank(),
                            world_size=dist.get_world_size())
result = [evaluator.losses(model).tolist(), *evaluator(model)]
if dist.get_rank() == 0:
    open({out!r}, "w").write(json.dumps(result))
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_processes_give_the_one_process_number(tmp_path):
    objective = build_objective({"objective": "flow", "time_sampling": "logit_normal"})
    model = _model(objective, 0)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), weights=str(tmp_path / "weights.pt"), out=str(tmp_path / "two.json")))
    run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29613", str(script)],
               env={"OMP_NUM_THREADS": "1"})
    losses, mean, se = json.loads((tmp_path / "two.json").read_text())
    evaluator = _evaluator(objective, num_images=23, times=3, batch_size=4)
    assert np.array_equal(np.array(losses), evaluator.losses(model))
    assert (mean, se) == evaluator(model)
