"""kl-bench: stable KL divergences between Gaussians on NumPy, Torch and JAX, and the suite that
measures them against mpmath references."""

from .kl import FAMILIES, METHODS, kl_cov, kl_diag, kl_normal, kl_tril, kl_vae

__version__ = "0.1.0"
__all__ = ["FAMILIES", "METHODS", "kl_cov", "kl_diag", "kl_normal", "kl_tril", "kl_vae", "__version__"]
