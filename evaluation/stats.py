"""Feature statistics (mu, Sigma) as float64 sums, and the reference-statistics files they are compared with.

FID needs only the mean and covariance of the features. Keeping the sufficient statistics n, sum f and
sum f f^T (float64) instead of the features makes them additive: chunks of one big npz, shards written by
several jobs and DDP ranks (one all_reduce SUM) merge into exactly the statistics of a single pass.

Reference files: ADM's npz (`mu`, `sigma`, and `mu_s`, `sigma_s` of the sFID features, e.g.
VIRTUAL_imagenet256_labeled.npz; other keys ignored), our own npz (the same keys in float64, plus `n`), and
torch-fidelity's cached statistics (`*-stat-fid-2048.pt`, a dict of `mu`, `sigma`) or cached features
(`*-features-2048.pt`, an (N, 2048) tensor).
"""

import os
import pickle

import numpy as np
import torch
from utils.errors import ConfigError, MissingFile
from utils.files import atomic_write


class FeatureStats:
    """Running n, sum f and sum f f^T of feature rows, in float64 on `device`."""

    def __init__(self, dim=2048, device="cpu"):
        self.n = torch.zeros((), dtype=torch.int64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)                 # sum_i f_i
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)      # sum_i f_i f_i^T

    @property
    def dim(self):
        return self.sum.shape[0]

    @property
    def count(self):
        return int(self.n)

    def update(self, features):
        """Add rows of (N, dim) features (any float dtype; accumulated in float64)."""
        f = features.detach().to(device=self.sum.device, dtype=torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(dim=0)
        self.sum_outer += f.T @ f
        return self

    def merge(self, other):
        """Add another FeatureStats (a shard, a chunk) into this one."""
        self.n += other.n.to(self.n.device)
        self.sum += other.sum.to(self.sum.device)
        self.sum_outer += other.sum_outer.to(self.sum_outer.device)
        return self

    def all_reduce(self, group=None):
        """Sum the statistics of every rank in place (torch.distributed; NCCL needs them on the GPU)."""
        import torch.distributed as dist

        for t in (self.n, self.sum, self.sum_outer):
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return self

    def mean(self):
        """mu = sum f / n, float64 numpy (dim,)."""
        if self.count < 1:
            raise ConfigError("no features accumulated")
        return (self.sum / self.count).cpu().numpy()

    def covariance(self):
        """Unbiased Sigma = (sum f f^T - n mu mu^T) / (n - 1), float64 numpy (dim, dim); np.cov's convention."""
        n = self.count
        if n < 2:
            raise ConfigError(f"a covariance needs at least 2 samples, got {n}")
        mu = self.sum / n
        sigma = (self.sum_outer - n * torch.outer(mu, mu)) / (n - 1)
        sigma = 0.5 * (sigma + sigma.T)  # f^T f from BLAS is symmetric only up to rounding
        return sigma.cpu().numpy()

    def reference(self):
        """{"mu", "sigma", "n"}: what save_reference writes and frechet_distance reads."""
        return {"mu": self.mean(), "sigma": self.covariance(), "n": self.count}

    def state_dict(self):
        return {"n": self.n, "sum": self.sum, "sum_outer": self.sum_outer}

    @classmethod
    def from_state_dict(cls, state, device="cpu"):
        stats = cls(dim=state["sum"].shape[0], device=device)
        stats.n += torch.as_tensor(state["n"]).to(device)
        stats.sum += torch.as_tensor(state["sum"], dtype=torch.float64).to(device)
        stats.sum_outer += torch.as_tensor(state["sum_outer"], dtype=torch.float64).to(device)
        return stats

    @classmethod
    def from_moments(cls, mu, sigma, n, device="cpu"):
        """Rebuild the sums from (mu, Sigma, n), e.g. to merge reference files; exact up to float64 rounding."""
        mu = torch.as_tensor(np.asarray(mu, dtype=np.float64), device=device)
        sigma = torch.as_tensor(np.asarray(sigma, dtype=np.float64), device=device)
        return cls.from_state_dict(
            {"n": int(n), "sum": n * mu, "sum_outer": (n - 1) * sigma + n * torch.outer(mu, mu)}, device
        )


# ---------------------------------------------------------------------------------------------------------
# Reference files
# ---------------------------------------------------------------------------------------------------------

def save_reference(path, mu, sigma, **extra):
    """Write an npz with `mu` (D,) and `sigma` (D, D) in float64 (ADM's keys), plus any `extra` arrays."""
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"  # what np.savez would do anyway; load_reference goes by the suffix
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: np.savez(tmp, mu=np.asarray(mu, dtype=np.float64),
                                            sigma=np.asarray(sigma, dtype=np.float64), **extra))
    return path


def _moments(mu, sigma, source, suffix=""):
    mu = np.asarray(mu, dtype=np.float64)    # torch-fidelity keeps mu in float32, ADM in float64
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ConfigError(f"{source}: expected mu{suffix} (D,) and sigma{suffix} (D, D), got {mu.shape} and "
                         f"{sigma.shape}")
    return mu, sigma


def _as_reference(mu, sigma, n=None, source="", spatial=None):
    out = dict(zip(("mu", "sigma"), _moments(mu, sigma, source)))
    if n is not None:
        out["n"] = int(n)
    if spatial is not None:
        out["mu_s"], out["sigma_s"] = _moments(*spatial, source, suffix="_s")
    return out


# torch-fidelity's statistics cache pickles float numpy arrays (mu float32, sigma float64). These are all that
# weights_only=True needs to read them: the array rebuild function (by its numpy 2 and numpy 1 names), ndarray and
# the float dtypes. Object arrays stay refused (their dtype class is not on the list).
def _numpy_float_globals():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    return [(_reconstruct, "numpy._core.multiarray._reconstruct"), (_reconstruct, "numpy.core.multiarray._reconstruct"),
            np.ndarray, np.dtype, type(np.dtype(np.float32)), type(np.dtype(np.float64))]


def _load_torch_reference(path, trust_pickle):
    """The object in a torch-fidelity cache file: tensors, containers and float numpy arrays only (weights_only=True),
    or anything with trust_pickle (weights_only=False: runs the file's code)."""
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(_numpy_float_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:200]
        raise ConfigError(
            f"{path}: the reference statistics need unpickling beyond tensors and float numpy arrays, which could run "
            f"code, so the file was not loaded ({reason}). If you made this file or trust its source, opt in with "
            f"--trust-pickle (python -m evaluation) or load_reference(path, trust_pickle=True) / "
            f"evaluate(..., trust_pickle=True); otherwise make the statistics again as an .npz with `python -m "
            f"evaluation ref ...`") from None


def load_reference(path, trust_pickle=False):
    """Read reference statistics -> {"mu": float64 (D,), "sigma": float64 (D, D)[, "n": int][, "mu_s", "sigma_s"]
    [, "feature_network", "feature_weights_sha256"]}.

    .npz: ADM's files and ours (keys `mu`, `sigma`; `n`, the sFID statistics `mu_s`, `sigma_s` and the network
    that made them when present; files without `feature_network` hold Inception features). Never unpickled.
    .pt: torch-fidelity's cache: a statistics dict (`mu`, `sigma`) or a features tensor (N, D). Read with
    torch.load(weights_only=True), allowing only float numpy arrays (what torch-fidelity stores); a file that needs
    more unpickling is refused with a message naming the opt-in, trust_pickle=True (CLI: --trust-pickle), which
    unpickles it fully and so runs whatever code it holds: only for a file you made or trust.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFile(f"reference statistics {path} not found. Make them from real images with `python -m "
                          f"evaluation ref <image folder | samples .npz> --out {path}` (or `--data NAME` for a "
                          f"dataset; add --features digits|dinov2 to match the evaluation's), or download a published "
                          f"file such as ADM's VIRTUAL_imagenet256_labeled.npz for Inception FID on ImageNet 256")
    if path.endswith(".npz"):
        with np.load(path) as f:
            if "mu" not in f or "sigma" not in f:
                raise KeyError(f"{path}: a reference npz needs keys 'mu' and 'sigma', found {sorted(f.keys())}")
            n = f["n"] if "n" in f else None
            spatial = (f["mu_s"], f["sigma_s"]) if "mu_s" in f and "sigma_s" in f else None
            out = _as_reference(f["mu"], f["sigma"], n, path, spatial)
            for key in ("feature_network", "feature_weights_sha256"):  # which network made them (ours only)
                if key in f:
                    out[key] = str(f[key])
            return out
    if path.endswith(".pt") or path.endswith(".pth"):
        obj = _load_torch_reference(path, trust_pickle)
        if isinstance(obj, dict) and "mu" in obj and "sigma" in obj:
            return _as_reference(obj["mu"], obj["sigma"], obj.get("n"), path)
        if torch.is_tensor(obj) and obj.ndim == 2:
            return FeatureStats(obj.shape[1]).update(obj).reference()
        raise ConfigError(f"{path}: not torch-fidelity statistics (dict with mu, sigma) or features (N, D)")
    raise ConfigError(f"{path}: reference statistics must be an .npz (ADM / ours) or a torch-fidelity .pt cache file")
