"""What is measured: one implementation of the KL families on one backend, device and mode.

The registry holds this project's kernels (stable and naive, on every backend and device, as
called, under the caller's ``jax.jit`` and under ``torch.compile``) and the implementations people
use today: ``torch.distributions.kl_divergence`` (Normal, Independent Normal, MultivariateNormal by
scale_tril and by covariance_matrix, LowRankMultivariateNormal for the low-rank family and, as a
second subject, for the diagonal families),
numpyro's, TensorFlow Probability's (JAX substrate), distrax's, Pyro's and GPyTorch's KLs, and
the textbook formula written in NumPy as users write it. Each third party's module is optional:
where it is not installed its subject says so (a skip reason).

Every subject is called like ``kl_bench.kl_<family>`` on arrays of its backend, takes the same
float64 case arrays (already rounded to the dtype under test, so the conversion is exact) and
returns float64 NumPy results. A subject that cannot run here says why (a skip reason).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from dataclasses import dataclass

import numpy as np

from .. import accel, backends, families, kl
from .cases import low_rank_covariance

DEVICES = ("cpu", "cuda")
ARRAY = accel.ARRAY  # op by op on the framework's arrays (third parties run so too)
# How this project's kernels run, and the backends each way applies to.
MODES = {
    ARRAY: ("numpy", "torch", "jax"),  # (JAX compiles and caches the kernel itself)
    "numba": ("numpy", "torch"),  # the fused CPU kernels of kl_bench.accel
    "triton": ("torch",),  # the fused GPU kernels of kl_bench.accel (on CPU tensors: Triton's interpreter)
    "xla": ("jax",),  # the XLA custom call of kl_bench.accel (JAX on the CPU, also inside jax.jit)
    "jax.jit": ("jax",),  # inside the caller's jit
    "torch.compile": ("torch",),
}
FUSED_LABELS = {"numba": "numba", "xla": "the XLA custom call", "triton": "Triton"}  # the fused modes, in skip reasons


@dataclass(frozen=True)
class Subject:
    """This project's kernels: ``method`` stable or naive; ``mode`` one of ``MODES``. A plain call
    of ``kl_bench.kl_*`` takes the "numba" way where it applies and numba is installed."""

    backend: str
    device: str = "cpu"
    method: str = "stable"
    mode: str = ARRAY

    implementation = "kl_bench"
    family_names = families.NAMES
    requires = ()  # modules beyond the backend's framework

    @property
    def name(self) -> str:
        where = f"{self.backend}-{self.device}" + (f", {self.mode}" if self.mode != ARRAY else "")
        label = f"{self.implementation}.{self.method}" if self.method else self.implementation
        return f"{label}[{where}]"

    @property
    def ours(self) -> bool:
        return self.implementation == "kl_bench"

    @property
    def be(self) -> backends.Backend:
        return backends.get(self.backend)

    def unavailable(self, family: str | None = None, dtype: str | None = None) -> str | None:
        """Why this subject cannot run here (a skip reason), or None."""
        be = self.be
        if not be.installed():
            return f"{self.backend} is not installed"
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            return f"{', '.join(missing)} is not installed"
        if self.device not in be.devices():
            return f"no {self.device.upper()} device visible to {self.backend}"
        if dtype is not None and dtype not in be.dtypes():
            return f"{self.backend} has no {dtype}"
        if self.mode == "torch.compile" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
            return "torch.compile on CPU needs a C++ compiler"
        if self.mode in accel.REGISTRY:
            return self._accelerated_unavailable(family, dtype)
        if family is not None and family not in self.family_names:
            return f"{self.name} has no {family} family"
        return None

    def _accelerated_unavailable(self, family, dtype):
        kernel = accel.REGISTRY[self.mode]
        label = FUSED_LABELS[self.mode]
        if not kernel.available():
            return f"{kernel.requires} is not installed"
        if self.method != "stable":
            return f"{label} fuses the stable kernels only"
        if self.device not in kernel.devices:
            return f"{label} runs on the {' and '.join(d.upper() for d in kernel.devices)} only"
        if self.mode == "triton" and self.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on CUDA tensors, and on CPU ones only under TRITON_INTERPRET=1"
        kernel_families = families.with_kernel(self.mode)
        if family is not None and family not in kernel_families:
            return f"{label} fuses only the {', '.join(kernel_families)} families"
        if self.mode == "numba" and dtype == "float64":
            return "numba fuses float32 and half precision (float64 takes the array path)"
        if family is not None and family not in self.family_names:
            return f"{self.name} has no {family} family"
        return None

    def asarray(self, x: np.ndarray, dtype: str):
        """``x`` as an array of this subject's backend and device (within ``be.computing(dtype)``)."""
        device = "cuda" if self.device == "cuda" else None
        if self.backend == "jax" and device:
            device = next(d for d in self.be.jax.devices() if d.platform in ("gpu", "cuda"))
        return self.be.asarray(x, dtype=dtype, device=device)

    def function(self, family: str):
        """The callable measured: backend arrays in (as ``kl_bench.kl_<family>``), KLs out."""
        return _ours(family, self.method, self.mode)

    def run(self, family: str, arrays, dtype: str) -> np.ndarray:
        with self.be.computing(dtype):
            args = [self.asarray(a, dtype) for a in arrays]
            return self.be.to_numpy(self.function(family)(*args))

    def gradient(self, family: str, arrays, dtype: str, jit: bool = False) -> list[np.ndarray]:
        """d (sum of the KLs) / d each argument through the backend's autodiff, as float64
        (``jit``: under jax.jit, on JAX)."""
        with self.be.computing(dtype):
            args = [self.asarray(a, dtype) for a in arrays]
            return [self.be.to_numpy(g) for g in self.be.grad_of_sum(self.function(family), args, jit)]


@functools.cache
def _ours(family, method, mode):
    fn = functools.partial(getattr(kl, f"kl_{family}"), method=method)
    if mode == ARRAY or mode in accel.REGISTRY:
        return _with_kernel(fn, mode)
    if mode == "jax.jit":
        return backends.get("jax").compile(fn)
    if mode == "torch.compile":
        import torch

        return torch.compile(fn, dynamic=True)
    return fn


def _with_kernel(fn, kernel):
    @functools.wraps(fn)
    def call(*args):
        with accel.use(kernel):
            return fn(*args)

    return call


@dataclass(frozen=True)
class TorchDistributions(Subject):
    """``torch.distributions.kl_divergence``; method "" uses Normal / Independent(Normal) /
    MultivariateNormal / LowRankMultivariateNormal, method "LowRank" uses LowRankMultivariateNormal
    for the diagonal families."""

    backend: str = "torch"
    method: str = ""

    implementation = "torch.distributions"

    @property
    def family_names(self):
        return ("diag", "vae") if self.method == "LowRank" else families.NAMES

    def function(self, family):
        return functools.partial(_torch_distributions, family, self.method == "LowRank")


def _by_distributions(family, args, *, normal, diagonal, full, kl, zeros_like, low_rank=None):
    """Build p and q with a library's distribution classes and call its KL: ``normal(loc, scale)``,
    ``diagonal(loc, logvar)`` its diagonal Gaussian, ``full(loc, kind, matrix)`` its full-covariance
    one (kind "scale_tril" or "covariance_matrix"), ``low_rank(loc, factor, diagonal)`` its
    W W^T + diag(d) one; the VAE term is the diagonal family against N(0, I)."""
    if family == "vae":
        args, family = _against_standard_normal(args, zeros_like), "diag"
    if family == "lowrank":
        return kl(low_rank(*args[:3]), low_rank(*args[3:]))
    mu_p, a, mu_q, b = args
    if family == "normal":
        return kl(normal(mu_p, a), normal(mu_q, b))
    if family == "diag":
        return kl(diagonal(mu_p, a), diagonal(mu_q, b))
    kind = "scale_tril" if family == "tril" else "covariance_matrix"
    return kl(full(mu_p, kind, a), full(mu_q, kind, b))


def _against_standard_normal(args, zeros_like):
    """The VAE term's (loc, logvar) as the diagonal family's arguments, q = N(0, I)."""
    loc, logvar = args
    return loc, logvar, zeros_like(loc), zeros_like(logvar)


def _torch_distributions(family, low_rank, *args):
    import torch
    from torch.distributions import Independent, LowRankMultivariateNormal, MultivariateNormal, Normal, kl_divergence

    def diagonal(loc, logvar):
        if low_rank:
            no_factor = torch.zeros(logvar.shape + (1,), dtype=logvar.dtype, device=logvar.device)
            return LowRankMultivariateNormal(loc, no_factor, torch.exp(logvar))
        return Independent(Normal(loc, torch.exp(0.5 * logvar)), 1)

    return _by_distributions(family, args, normal=Normal, diagonal=diagonal, kl=kl_divergence, zeros_like=torch.zeros_like,
                             full=lambda loc, kind, m: MultivariateNormal(loc, **{kind: m}), low_rank=LowRankMultivariateNormal)


@dataclass(frozen=True)
class Numpyro(Subject):
    """numpyro's ``kl_divergence`` on JAX arrays (Normal, Independent, MultivariateNormal)."""

    backend: str = "jax"
    method: str = ""

    implementation = "numpyro"
    requires = ("numpyro",)
    family_names = tuple(f for f in families.NAMES if f != "lowrank")  # no KL for its LowRankMultivariateNormal

    def function(self, family):
        return functools.partial(_numpyro, family)


def _numpyro(family, *args):
    import jax.numpy as jnp
    from numpyro.distributions import MultivariateNormal, Normal, kl_divergence

    return _by_distributions(family, args, normal=Normal, kl=kl_divergence, zeros_like=jnp.zeros_like,
                             diagonal=lambda loc, logvar: Normal(loc, jnp.exp(0.5 * logvar)).to_event(1),
                             full=lambda loc, kind, m: MultivariateNormal(loc, **{kind: m}))


@dataclass(frozen=True)
class TFP(Subject):
    """TensorFlow Probability on its JAX substrate: ``tfd.kl_divergence`` of Normal,
    MultivariateNormalDiag, MultivariateNormalTriL and MultivariateNormalFullCovariance."""

    backend: str = "jax"
    method: str = ""

    implementation = "tfp"
    requires = ("tensorflow_probability",)
    family_names = tuple(f for f in families.NAMES if f != "lowrank")  # no KL for MultivariateNormalDiagPlusLowRankCovariance

    def function(self, family):
        return functools.partial(_tfp, family)


def _tfp(family, *args):
    import jax.numpy as jnp
    from tensorflow_probability.substrates.jax import distributions as tfd

    full = {"scale_tril": tfd.MultivariateNormalTriL, "covariance_matrix": tfd.MultivariateNormalFullCovariance}
    return _by_distributions(family, args, normal=tfd.Normal, kl=tfd.kl_divergence, zeros_like=jnp.zeros_like,
                             diagonal=lambda loc, logvar: tfd.MultivariateNormalDiag(loc, jnp.exp(0.5 * logvar)),
                             full=lambda loc, kind, m: full[kind](loc, m))


@dataclass(frozen=True)
class Distrax(Subject):
    """distrax's ``kl_divergence`` of Normal, MultivariateNormalDiag and MultivariateNormalTri
    (lower); it has no covariance-matrix family here."""

    backend: str = "jax"
    method: str = ""

    implementation = "distrax"
    requires = ("distrax",)
    family_names = ("normal", "diag", "vae", "tril")

    def function(self, family):
        return functools.partial(_distrax, family)


def _distrax(family, *args):
    import distrax
    import jax.numpy as jnp

    return _by_distributions(family, args, normal=distrax.Normal, kl=lambda p, q: p.kl_divergence(q), zeros_like=jnp.zeros_like,
                             diagonal=lambda loc, logvar: distrax.MultivariateNormalDiag(loc, jnp.exp(0.5 * logvar)),
                             full=lambda loc, kind, m: distrax.MultivariateNormalTri(loc, m, is_lower=True))


@dataclass(frozen=True)
class Pyro(Subject):
    """Pyro's own ``kl_divergence`` registration, the one that differs from Torch's: a diagonal p
    (Independent Normal) against a MultivariateNormal q (here the diagonal q by ``scale_tril``, and
    N(0, I) for the VAE term). Importing ``pyro.distributions`` registers it (and an
    Independent-Independent rule with the same arithmetic as Torch's) in torch.distributions."""

    backend: str = "torch"
    method: str = ""

    implementation = "pyro"
    requires = ("pyro",)
    family_names = ("diag", "vae")

    def function(self, family):
        return functools.partial(_pyro, family)


def _pyro(family, *args):
    import pyro.distributions as dist
    import pyro.distributions.kl  # noqa: F401 (registers Pyro's rules)
    import torch

    if family == "vae":
        args = _against_standard_normal(args, torch.zeros_like)
    loc_p, logvar_p, loc_q, logvar_q = args
    p = dist.Independent(dist.Normal(loc_p, torch.exp(0.5 * logvar_p)), 1)
    q = dist.MultivariateNormal(loc_q, scale_tril=torch.diag_embed(torch.exp(0.5 * logvar_q)))
    return torch.distributions.kl_divergence(p, q)


@dataclass(frozen=True)
class GPyTorch(Subject):
    """GPyTorch's ``MultivariateNormal`` and its KL (``kl_mvn_mvn``, the variational GP's), with
    the covariance as a linear operator: diagonal (``DiagLinearOperator``), from a Cholesky factor
    (``CholLinearOperator``), low rank plus diagonal (``LowRankRootAddedDiagLinearOperator``) or
    dense."""

    backend: str = "torch"
    method: str = ""

    implementation = "gpytorch"
    requires = ("gpytorch",)
    family_names = ("diag", "vae", "tril", "cov", "lowrank")

    def function(self, family):
        return functools.partial(_gpytorch, family)


def _gpytorch(family, *args):
    import torch
    from gpytorch.distributions import MultivariateNormal
    from linear_operator.operators import (
        CholLinearOperator,
        DiagLinearOperator,
        LowRankRootAddedDiagLinearOperator,
        LowRankRootLinearOperator,
        TriangularLinearOperator,
    )

    def full(loc, kind, m):
        return MultivariateNormal(loc, CholLinearOperator(TriangularLinearOperator(m)) if kind == "scale_tril" else m)

    def low_rank(loc, factor, diagonal):
        return MultivariateNormal(loc, LowRankRootAddedDiagLinearOperator(LowRankRootLinearOperator(factor), DiagLinearOperator(diagonal)))

    return _by_distributions(family, args, normal=None, kl=torch.distributions.kl_divergence, zeros_like=torch.zeros_like,
                             diagonal=lambda loc, logvar: MultivariateNormal(loc, DiagLinearOperator(torch.exp(logvar))), full=full,
                             low_rank=low_rank)


@dataclass(frozen=True)
class Textbook(Subject):
    """The textbook formula in NumPy, as users write it: explicit inverse and determinants."""

    backend: str = "numpy"
    method: str = ""

    implementation = "textbook"

    def function(self, family):
        return TEXTBOOK[family]


def textbook_normal(mu_p, s_p, mu_q, s_q):
    return np.log(s_q / s_p) + (s_p**2 + (mu_p - mu_q) ** 2) / (2 * s_q**2) - 0.5


def textbook_diag(mu_p, l_p, mu_q, l_q):
    return 0.5 * np.sum(l_q - l_p + (np.exp(l_p) + (mu_p - mu_q) ** 2) / np.exp(l_q) - 1, axis=-1)


def textbook_vae(mu, logvar):
    return -0.5 * np.sum(1 + logvar - mu**2 - np.exp(logvar), axis=-1)


def textbook_cov(mu_p, s_p, mu_q, s_q):
    k = s_p.shape[-1]
    inv_q = np.linalg.inv(s_q)
    d = (mu_q - mu_p)[..., None]
    quad = (np.swapaxes(d, -1, -2) @ inv_q @ d)[..., 0, 0]
    return 0.5 * (np.trace(inv_q @ s_p, axis1=-2, axis2=-1) + quad - k + np.log(np.linalg.det(s_q) / np.linalg.det(s_p)))


def textbook_tril(mu_p, l_p, mu_q, l_q):
    l_p, l_q = np.tril(l_p), np.tril(l_q)
    return textbook_cov(mu_p, l_p @ np.swapaxes(l_p, -1, -2), mu_q, l_q @ np.swapaxes(l_q, -1, -2))


def textbook_lowrank(mu_p, w_p, d_p, mu_q, w_q, d_q):
    return textbook_cov(mu_p, low_rank_covariance(w_p, d_p), mu_q, low_rank_covariance(w_q, d_q))


TEXTBOOK = {"normal": textbook_normal, "diag": textbook_diag, "vae": textbook_vae, "tril": textbook_tril, "cov": textbook_cov,
            "lowrank": textbook_lowrank}


FUSED = tuple(accel.REGISTRY)  # the accelerated kernels' modes: stable only


def ours(methods=("stable", "naive"), backend_names=None, modes=(ARRAY, *FUSED)) -> list[Subject]:
    """This project's kernels on every known backend and device (available or not)."""
    names = backend_names or list(backends.BACKENDS)
    out = []
    for b in names:
        for d in DEVICES:
            if b == "numpy" and d == "cuda":
                continue
            for mode in modes:
                if b not in MODES[mode] or (mode in FUSED and d not in accel.REGISTRY[mode].devices):
                    continue
                out.extend(Subject(b, d, m, mode) for m in methods if not (mode in FUSED and m != "stable"))
    return out


def third_party() -> list[Subject]:
    """What people use today, on every device (available or not)."""
    out: list[Subject] = [Textbook()]
    for d in DEVICES:
        out += [TorchDistributions(device=d), TorchDistributions(device=d, method="LowRank"), Numpyro(device=d), TFP(device=d),
                Distrax(device=d), Pyro(device=d), GPyTorch(device=d)]
    return out


def registry(compiled: bool = False) -> list[Subject]:
    """Every subject known (available or not); ``compiled`` adds this project's kernels under the
    caller's ``jax.jit`` and under ``torch.compile`` (compiling costs seconds per shape)."""
    modes = tuple(MODES) if compiled else (ARRAY, *FUSED)
    return ours(modes=modes) + third_party()


def by_name(name: str, subjects=None) -> Subject:
    for s in subjects or registry(compiled=True):
        if s.name == name:
            return s
    raise ValueError(f"unknown subject {name!r}")


def available(backend_names=None, methods=("stable", "naive"), names=None, compiled=False) -> list[Subject]:
    """Subjects that can run here: this project's ``methods`` and every third party, on the given
    backends (default: every installed one); ``names`` keeps those whose name contains one of the
    given strings."""
    backend_names = backend_names or backends.installed()
    chosen = []
    for s in registry(compiled=compiled):
        if s.backend not in backend_names or s.unavailable() is not None:
            continue
        if s.ours and s.method not in methods:
            continue
        if names and not any(n in s.name for n in names):
            continue
        chosen.append(s)
    return chosen


def labels(subject: Subject) -> dict:
    """The columns that name a subject in every table."""
    return {"subject": subject.name, "implementation": subject.implementation, "backend": subject.backend,
            "device": subject.device, "method": subject.method, "mode": subject.mode}


def describe(exc: BaseException) -> str:
    """One line naming an exception a subject raised."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
