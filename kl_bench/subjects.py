"""What is measured: an implementation of a KL family on a backend and device.

Every subject takes the same float64 case arrays (already rounded to the dtype under test),
converts them exactly, runs, and returns the results as float64 NumPy values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import backends, kl

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Subject:
    backend: str
    device: str = "cpu"
    method: str = "stable"

    @property
    def name(self) -> str:
        return f"kl_bench.{self.method}[{self.backend}-{self.device}]"

    @property
    def be(self) -> backends.Backend:
        return backends.get(self.backend)

    def unavailable(self, dtype: str | None = None) -> str | None:
        """Why this subject cannot run here (a skip reason), or None."""
        be = self.be
        if not be.installed():
            return f"{self.backend} is not installed"
        if self.device not in be.devices():
            return f"no {self.device.upper()} device visible to {self.backend}"
        if dtype is not None and dtype not in be.dtypes():
            return f"{self.backend} has no {dtype}"
        return None

    def prepare(self):
        """One-time framework set-up (JAX needs float64 switched on)."""
        if self.backend == "jax":
            self.be.enable_x64()

    def asarray(self, x: np.ndarray, dtype: str):
        self.prepare()
        device = "cuda" if self.device == "cuda" else None
        if self.backend == "jax" and device:
            device = next(d for d in self.be.jax.devices() if d.platform in ("gpu", "cuda"))
        return self.be.asarray(x, dtype=dtype, device=device)

    def function(self, family: str):
        return getattr(kl, f"kl_{family}")

    def run(self, family: str, arrays, dtype: str, **kwargs) -> np.ndarray:
        args = [self.asarray(a, dtype) for a in arrays]
        result = self.function(family)(*args, method=self.method, **kwargs)
        return self.be.to_numpy(result)


def ours(methods=("stable", "naive"), backend_names=None) -> list[Subject]:
    """This project's kernels on every known backend and device (available or not)."""
    names = backend_names or list(backends.BACKENDS)
    return [Subject(b, d, m) for b in names for d in DEVICES for m in methods if not (b == "numpy" and d == "cuda")]
