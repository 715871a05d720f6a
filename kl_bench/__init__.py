"""kl-bench: stable KL divergences between Gaussians on NumPy, Torch and JAX, and the suite that
measures them against mpmath references.

The library is this package's top level (``kl``, ``mixture``, ``kernels``, ``families``, ``backends``,
``accel/``); the suite that measures it is ``kl_bench.suite`` and is imported only when asked for
(``kl_bench.check``, the ``kl-bench`` command, the pytest plugin's fixtures)."""

from .kl import FAMILIES, METHODS, kl_cov, kl_diag, kl_lowrank, kl_normal, kl_tril, kl_vae
from .mixture import MixtureKL, kl_mixture

__version__ = "0.1.0"
__all__ = ["FAMILIES", "METHODS", "MixtureKL", "check", "kl_cov", "kl_diag", "kl_lowrank", "kl_mixture", "kl_normal", "kl_tril",
           "kl_vae", "__version__"]


def __getattr__(name):
    if name == "check":  # the checker needs pandas and mpmath: import them only when asked for
        from .suite.checker import check

        return check
    raise AttributeError(f"module 'kl_bench' has no attribute {name!r}")
