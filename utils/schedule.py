"""The learning-rate schedule: warm-up, constant, and an optional linear decay (warm-up, stable, decay) to a floor,
held after the decay ends."""

from .errors import ConfigError


def learning_rate(step, base_lr, warmup_steps, cooldown_steps=0, total_steps=0, final_lr=0.0):
    """The rate of update step+1: a linear warm-up to base_lr over warmup_steps, constant (the paper: 1e-4
    throughout), and with cooldown_steps > 0 a linear decay over the last cooldown_steps before step total_steps,
    from base_lr to final_lr (warm-up, stable, decay: Hägele et al. 2024, 2405.18392), held at final_lr after it.
    With final_lr 0 the last update (step total_steps - 1) has base_lr / cooldown_steps. The decay is RAE's linear
    scheduler (bytetriper/RAE src/utils/optim_utils.py): base_lr (1 - (1 - final_lr / base_lr) (step - W) / (E - W))
    between W = total_steps - cooldown_steps and E = total_steps."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if cooldown_steps <= 0:
        return base_lr * warm
    cool = min(1.0, max(0.0, (total_steps - step) / cooldown_steps))
    return min(base_lr * warm, final_lr + (base_lr - final_lr) * cool)


def cooldown_steps(fraction, total_steps):
    """optim.cooldown_fraction of train.steps (or of optim.cooldown_end), as the number of decaying steps."""
    if not 0 <= fraction <= 1:
        raise ConfigError(f"optim.cooldown_fraction={fraction} must be between 0 (a constant rate) and 1 (a decay "
                          f"over all of train.steps)")
    return round(fraction * total_steps)


def schedule(optim, train_steps):
    """The rate of each update (step -> lr) from the optim group: warmup_steps, cooldown_fraction, and where the
    decay ends (cooldown_end, null: train.steps; the fraction is of that length; a run may stop before it, as a prefix
    of the longer schedule) and the rate it ends at (final_lr, in units of optim.lr: under μP every parameter group
    scales it like lr; held from cooldown_end to train.steps)."""
    base, final = optim.lr, optim.get("final_lr") or 0.0
    end = train_steps if optim.get("cooldown_end") is None else optim.cooldown_end
    if not 0 <= final <= base:
        raise ConfigError(f"optim.final_lr={final} must be between 0 and optim.lr={base}: the rate the decay ends at")
    if end <= 0:
        raise ConfigError(f"optim.cooldown_end={end} must be a positive step: the step the decay ends at (null: "
                          f"train.steps; beyond train.steps the run stops part-way along the schedule)")
    if final and not optim.cooldown_fraction:
        raise ConfigError(f"optim.final_lr={final} needs a decay to end at it: set optim.cooldown_fraction > 0")
    cool = cooldown_steps(optim.cooldown_fraction, end)
    return lambda step: learning_rate(step, base, optim.warmup_steps, cool, end, final)


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
