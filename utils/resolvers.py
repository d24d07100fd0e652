"""The OmegaConf resolvers the configs use; importing this module registers them (train.py does)."""
from omegaconf import OmegaConf


def sweep_suffix(overrides):
    """run_dir's suffix for sweeps over settings other than model/data: "runs/digits/DiT-S-2_optim.lr=0.0003"."""
    return "_" + overrides.replace("/", "-") if overrides else ""


OmegaConf.register_new_resolver("sweep_suffix", sweep_suffix, replace=True)
