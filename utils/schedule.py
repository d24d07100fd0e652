"""The learning-rate schedule: warm-up, constant, and an optional linear decay at the end (warm-up, stable, decay)."""

from .errors import ConfigError


def learning_rate(step, base_lr, warmup_steps, cooldown_steps=0, total_steps=0):
    """The rate of update step+1: a linear warm-up to base_lr over warmup_steps, constant (the paper: 1e-4
    throughout), and with cooldown_steps > 0 a linear decay over the last cooldown_steps of total_steps, down to
    base_lr / cooldown_steps at the last update (warm-up, stable, decay: Hägele et al. 2024, 2405.18392)."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    cool = min(1.0, (total_steps - step) / cooldown_steps) if cooldown_steps > 0 else 1.0
    return base_lr * min(warm, cool)


def cooldown_steps(fraction, total_steps):
    """optim.cooldown_fraction of train.steps, as the number of decaying steps."""
    if not 0 <= fraction <= 1:
        raise ConfigError(f"optim.cooldown_fraction={fraction} must be between 0 (a constant rate) and 1 (a decay "
                          f"over all of train.steps)")
    return round(fraction * total_steps)


def budget_steps(train, gflops, batch_size):
    """train.steps, or with a compute budget train.flops the steps it buys, in the DiT paper's unit: 3 x forward
    multiply-adds per image x images, i.e. forward Gflops x 1e9 x 3 x batch x steps (hardware FLOPs are twice that)."""
    flops = train.get("flops")
    if flops is None:
        return train["steps"]
    if flops <= 0:
        raise ConfigError(f"train.flops={flops} must be a positive training compute (or null: train.steps decides)")
    steps = round(flops / (3 * gflops * 1e9 * batch_size))
    if steps < 1:
        raise ConfigError(f"train.flops={flops:.3g} buys no step of this model at batch {batch_size} "
                          f"({3 * gflops * 1e9 * batch_size:.3g} per step): raise it or use a smaller model")
    return steps
