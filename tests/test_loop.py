"""The training loop's parts on their own and the end-of-step bookkeeping: train_step without the loop, skipped steps
that still checkpoint and stop on signals, a torn metrics line, in-loop FID that a resume reproduces, the handlers
and process group restored on every exit, and every config key classified."""

import math
import signal
import warnings

import pytest
import torch
from omegaconf import OmegaConf

import train as train_script
from conftest import TINY, compose_config, final_state, read_run_metrics
from diffusion import build_objective
from models import create_model
from utils.checkpoint import list_checkpoints
from utils.errors import Diverged
from utils.files import atomic_write, atomic_write_text
from utils.logger import read_metrics, truncate_metrics
from utils.parallel import Trainables


# ------------------------------------------------------------------------------------------------------------
# train_step on its own
# ------------------------------------------------------------------------------------------------------------

def _step_inputs(objective, n=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=generator)
    y = torch.randint(0, 10, (n,), generator=generator)
    t, noise = objective.draw(generator, n, (1, 8, 8), "cpu")
    return x, t, y, noise, torch.zeros(n, 0)


@pytest.mark.parametrize("objective_name", ["ddpm", "flow"])
def test_train_step_gives_the_losses_and_the_norm_of_the_full_batch_gradients(objective_name):
    """One call, no loop: per-sample losses of the whole batch and the joint gradient norm; two micro-batches give
    the same losses and (summed) gradients as one."""
    objective = build_objective({"objective": objective_name})
    grads, results = [], []
    for accum in (1, 2):
        torch.manual_seed(0)
        model = create_model("DiT-Mini/2", input_size=8, in_channels=1, num_classes=10,
                             learn_sigma=objective.learn_sigma)
        torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)   # zero-init outputs give zero gradients
        trainables = Trainables().add(model.parameters(), torch.optim.AdamW(model.parameters()), model)
        trainables.zero_grad(1e-3)
        losses, norm = train_script.train_step(model, objective, trainables, _step_inputs(objective), accum=accum)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        results.append((losses, norm))
        assert losses["loss"].shape == (8,) and torch.isfinite(losses["loss"]).all()
        assert norm == pytest.approx(float(grads[-1].norm()), rel=1e-5)
    torch.testing.assert_close(results[1][0]["loss"], results[0][0]["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_train_step_clips_to_max_norm_and_refuses_a_bad_accumulation():
    objective = build_objective({"objective": "flow"})
    model = create_model("DiT-Mini/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)
    trainables = Trainables().add(model.parameters(), torch.optim.AdamW(model.parameters()), model)
    trainables.zero_grad(1e-3)
    _, norm = train_script.train_step(model, objective, trainables, _step_inputs(objective), max_norm=1e-3)
    clipped = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))
    assert float(norm) > 1e-3 and clipped == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(ValueError, match="train.grad_accum=3 must be a positive divisor"):
        train_script.train_step(model, objective, trainables, _step_inputs(objective), accum=3)


def test_activation_checkpointing_recomputes_with_the_forced_attention_kernel(tmp_path):
    """bf16 on a CPU forces the math attention kernel (train.attention=auto); the recomputation in the backward pass
    must use it too, or torch's checkpoint finds different saved tensors and stops."""
    train_script.train(compose_config(overrides=[*TINY, "precision=bf16", "train.attention=math", "train.steps=2",
                                                 "train.grad_checkpoint=true", "fid.at_end=false", f"run_dir={tmp_path}"]))
    assert final_state(tmp_path)["step"] == 2


# ------------------------------------------------------------------------------------------------------------
# Skipped steps still do the end-of-step bookkeeping
# ------------------------------------------------------------------------------------------------------------

def _poison(monkeypatch, calls, on_call=None):
    """train_step whose losses are NaN on the given calls (1-based); on_call(n) runs first."""
    real = train_script.train_step
    count = [0]

    def poisoned(*args, **kwargs):
        count[0] += 1
        losses, norm = real(*args, **kwargs)
        if on_call is not None:
            on_call(count[0])
        if count[0] in calls:
            losses = {**losses, "loss": losses["loss"] * float("nan")}
        return losses, norm
    monkeypatch.setattr(train_script, "train_step", poisoned)


def test_a_skipped_last_step_still_writes_the_final_checkpoint(tmp_path, monkeypatch):
    _poison(monkeypatch, calls={4})
    train_script.train(compose_config(overrides=[*TINY, "train.ckpt_every=1000", "train.skip_nonfinite=1",
                                                 "fid.at_end=false", f"run_dir={tmp_path}"]))
    ckpt = final_state(tmp_path)
    assert ckpt["step"] == 4 and ckpt["skipped_steps"] == 1
    assert [r["step"] for r in read_run_metrics(tmp_path) if r.get("skipped")] == [4]


def test_a_signal_during_a_skipped_step_is_acted_on_at_that_step(tmp_path, monkeypatch):
    send = lambda n: n == 2 and signal.raise_signal(signal.SIGTERM)
    _poison(monkeypatch, calls={2}, on_call=send)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        train_script.train(compose_config(overrides=[*TINY, "train.steps=6", "train.ckpt_every=1000",
                                                     "train.skip_nonfinite=1", f"run_dir={tmp_path}"]))
    assert stop.value.code == 128 + signal.SIGTERM
    assert [int(p.stem) for p in list_checkpoints(tmp_path / "checkpoints")] == [2]
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_diverged_run_restores_the_signal_handlers(tmp_path):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    with pytest.raises(Diverged):
        train_script.train(compose_config(overrides=[*TINY, "train.steps=30", "optim.lr=1e6", f"run_dir={tmp_path}"]))
    assert {sig: signal.getsignal(sig) for sig in before} == before


# ------------------------------------------------------------------------------------------------------------
# metrics.jsonl: one tolerant reader; a torn line does not stop a resume
# ------------------------------------------------------------------------------------------------------------

def test_a_torn_metrics_line_is_skipped_with_a_warning_and_kept_aside(tmp_path):
    run = [*TINY, "fid.at_end=false", f"run_dir={tmp_path}"]
    train_script.train(compose_config(overrides=run))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.3')          # killed mid-write
    with pytest.warns(UserWarning, match="not a JSON object"):
        assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [2, 4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_script.train(compose_config(overrides=[*run[:-2], "train.steps=6", "fid.at_end=false",
                                                     f"run_dir={tmp_path}"]))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [2, 4, 6]
    assert '"loss": 0.3' in (tmp_path / "metrics.dropped.jsonl").read_text()


def test_truncate_metrics_moves_later_rows_aside(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(f'{{"step": {s}}}\n' for s in (1, 2, 3, 4)))
    truncate_metrics(path, 2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.dropped.jsonl")] == [3, 4]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("No space left on device")
    with pytest.raises(OSError, match="No space"):
        atomic_write(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


# ------------------------------------------------------------------------------------------------------------
# In-loop FID: one noise definition, every draw from (seed, step)
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.slow   # ~3.5 s
def test_a_resumed_run_logs_the_same_fid_as_an_uninterrupted_one(tmp_path):
    """DDPM's stochastic sampler draws per-step noise: from the global RNG it would differ after a resume."""
    common = [*TINY, "diffusion=ddpm", "sample.steps=3", "fid.every=2", "fid.num_samples=20", "fid.batch_size=8"]
    train_script.train(compose_config(overrides=[*common, f"run_dir={tmp_path}/whole"]))
    train_script.train(compose_config(overrides=[*common, "train.steps=2", f"run_dir={tmp_path}/resumed"]))
    torch.manual_seed(123)   # whatever ran before in the process must not matter
    torch.rand(7)
    train_script.train(compose_config(overrides=[*common, f"run_dir={tmp_path}/resumed"]))
    fid = lambda run: {r["step"]: r["fid"] for r in read_run_metrics(tmp_path / run) if "fid" in r}
    assert fid("whole").keys() == {2, 4} and fid("resumed") == fid("whole")


def test_in_loop_and_sample_py_start_from_the_same_noise():
    from diffusion.sampling import initial_noise
    whole = initial_noise(3, range(10), (1, 8, 8))
    assert torch.equal(initial_noise(3, [7, 8, 9], (1, 8, 8)), whole[7:])   # per sample, not per batch
    assert not torch.equal(initial_noise(4, range(10), (1, 8, 8)), whole)


# ------------------------------------------------------------------------------------------------------------
# Every config key names the run or not, exactly one of the two
# ------------------------------------------------------------------------------------------------------------

def _leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


@pytest.mark.parametrize("experiment", [None, "digits-quick", "imagenet256", "lightningdit-xl1-vavae-imagenet256",
                                        "sit-xl1-e2evae-repa-imagenet256", "rae-ditdh-xl-imagenet256"])
def test_every_config_key_is_classified_once(experiment):
    from hydra import compose, initialize_config_dir
    from conftest import CONF

    overrides = [f"experiment={experiment}"] if experiment else []
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    resumes = set(cfg.hydra.job.config.override_dirname.exclude_keys) - {"model", "data", "experiment", "logger"}
    tree = OmegaConf.to_container(cfg, resolve=False)
    del tree["hydra"]
    under = lambda key, prefixes: any(key == p or key.startswith(p + ".") for p in prefixes)
    for key in _leaves(tree):
        names, resumed = under(key, train_script.NAMES_THE_RUN), under(key, resumes)
        assert names != resumed, (f"{key}: add it to train.NAMES_THE_RUN (a change is another run) or to "
                                  f"conf/train.yaml's exclude_keys (a change resumes)")


def test_settings_that_do_not_change_the_trajectory_resume_the_same_folder():
    from conftest import compose_config as compose_run

    base = compose_run(overrides=["logger=none"]).run_dir
    for override in ("optim.fused=false", "tf32=false", "train.attention=math", "fid.every=5"):
        assert compose_run(overrides=["logger=none", override]).run_dir == base, override
    assert compose_run(overrides=["logger=none", "optim.lr=1e-3"]).run_dir != base
