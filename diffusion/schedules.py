"""Noise schedules (betas) and timestep respacing."""

import math

import numpy as np
from utils.errors import ConfigError

# Names accepted by `get_named_beta_schedule`; "squaredcos_cap_v2" is the official repositories' name for cosine.
SCHEDULES = ("linear", "cosine", "squaredcos_cap_v2")


def get_named_beta_schedule(name, num_diffusion_timesteps):
    """float64 betas of a named schedule.

    linear: DDPM's 1e-4 -> 0.02 over 1000 steps, rescaled so other step counts give the same process.
    cosine: improved DDPM eq. 17, alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2) with s = 0.008.
    """
    if name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if name in ("cosine", "squaredcos_cap_v2"):
        return betas_for_alpha_bar(num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ConfigError(f"unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Discretise a continuous alpha_bar(t), t in [0, 1]: beta_i = 1 - alpha_bar(t_{i+1}) / alpha_bar(t_i),
    clipped at max_beta to avoid the singularity at t = 1 (improved DDPM Sec. 3.2)."""
    T = num_diffusion_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)], dtype=np.float64)


def space_timesteps(num_timesteps, section_counts):
    """The timesteps kept when sampling with fewer steps (improved DDPM Sec. 4.2).

    section_counts: "250" (250 evenly spaced steps), "10,15,20" (split the process into three equal
    sections and take that many evenly spaced steps from each), "ddim50" (DDIM's integer stride that
    gives exactly 50 steps), or an int / a list of ints.
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ConfigError(f"cannot take exactly {desired} steps from {num_timesteps} with an integer stride")
        section_counts = [int(c) for c in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ConfigError(f"cannot take {count} steps from a section of {size} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the fractional index (rather than multiply) so the rounding matches the reference code.
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)
