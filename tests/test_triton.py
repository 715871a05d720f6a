"""The Triton kernels (kl_bench.accel.triton_gpu) beyond the shared accuracy, gradient and
behaviour suites that run them as the ``triton`` mode: which arrays they take, long rows and many
programs, broadcasting gradients, half precision. Without a GPU they run in Triton's interpreter
on CPU tensors (the root conftest sets TRITON_INTERPRET=1 there)."""

import os

import numpy as np
import pytest

import kl_bench
from kl_bench import accel, backends

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="no GPU, and Triton's interpreter is off (TRITON_INTERPRET is not 1)")


def _both(fn, *args):
    """(Triton's result, the array path's)."""
    with accel.use("triton"):
        got = fn(*args)
    with accel.use("array"):
        want = fn(*args)
    return got, want


def test_auto_chooses_triton_for_cuda_tensors_only():
    be = backends.get("torch")
    cpu = [torch.zeros(2, 3)] * 2
    fused = accel.REGISTRY["triton"].impl()
    with accel.use("auto"):
        assert accel.select(be, "vae", "stable", cpu) is not fused  # CPU tensors: numba or the array path
    with accel.use("triton"):
        assert (accel.select(be, "vae", "stable", cpu) is fused) == (os.environ.get("TRITON_INTERPRET") == "1")
        assert accel.select(be, "vae", "naive", cpu) is None
        assert accel.select(be, "cov", "stable", cpu * 2) is None  # no Triton kernel for cov
        assert accel.select(backends.get("numpy"), "vae", "stable", [np.zeros((2, 3), np.float32)] * 2) is None


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_long_rows_and_many_programs(dtype):
    """k beyond one tile (the column loop) and more rows than one program takes."""
    rng = np.random.default_rng(0)
    shape = (3, 5000) if DEVICE == "cpu" else (300, 50_000)
    loc_p, logvar_p, loc_q, logvar_q = (torch.tensor(rng.normal(size=shape), dtype=getattr(torch, dtype), device=DEVICE) for _ in range(4))
    got, want = _both(kl_bench.kl_diag, loc_p, logvar_p, loc_q, logvar_q)
    torch.testing.assert_close(got, want, rtol=1e-12 if dtype == "float64" else 2e-6, atol=0)
    many = torch.tensor(rng.normal(size=(5000, 3)), dtype=getattr(torch, dtype), device=DEVICE)
    got, want = _both(kl_bench.kl_vae, many, many)
    torch.testing.assert_close(got, want, rtol=1e-12 if dtype == "float64" else 2e-6, atol=0)


@pytest.mark.parametrize("family", ["vae", "diag", "normal"])
def test_gradients_of_broadcast_arguments_come_back_in_their_shapes(family):
    rng = np.random.default_rng(1)
    shapes = {"vae": [(4, 6), (6,)], "diag": [(4, 6), (1, 6), (6,), (4, 1)], "normal": [(4, 6), (6,), (4, 1), ()]}[family]
    values = [rng.normal(size=s) for s in shapes]
    if family == "normal":
        values[1], values[3] = np.exp(values[1]), np.exp(values[3])
    f = getattr(kl_bench, f"kl_{family}")
    grads = {}
    for kernel in ("triton", "array"):
        args = [torch.tensor(v, dtype=torch.float64, device=DEVICE, requires_grad=True) for v in values]
        with accel.use(kernel):
            f(*args).sum().backward()
        grads[kernel] = [a.grad for a in args]
    for got, want, shape in zip(grads["triton"], grads["array"], shapes):
        assert tuple(got.shape) == shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_in_and_out(dtype):
    rng = np.random.default_rng(2)
    loc, logvar = (torch.tensor(rng.normal(size=(8, 32)), dtype=getattr(torch, dtype), device=DEVICE) for _ in range(2))
    with accel.use("triton"):
        got = kl_bench.kl_vae(loc, logvar)
    assert got.dtype == getattr(torch, dtype)
    exact = kl_bench.kl_vae(loc.double(), logvar.double())  # the same inputs, exactly, in float64
    assert torch.equal(got, exact.to(got.dtype))  # rounded once from a far more accurate value
