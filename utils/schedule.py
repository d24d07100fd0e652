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
