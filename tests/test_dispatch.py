"""Argument handling of the public functions: types, dtypes, shapes and the errors for bad input."""

import numpy as np
import pytest

import kl_bench
from kl_bench import backends

EYE = np.eye(3)
INDEFINITE = np.array([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # symmetric, eigenvalues 3, 1, -1


def test_python_scalars_and_lists_become_numpy_float64():
    out = kl_bench.kl_normal(0, 1, [0.5, 1], 2)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (2,)
    assert isinstance(kl_bench.kl_vae([1.0, 2.0], [0.0, 0.1]), np.floating)


def test_integers_promote_like_numpy():
    assert kl_bench.kl_vae(np.arange(3), np.zeros(3, dtype=np.int32)).dtype == np.float64
    assert kl_bench.kl_vae(np.arange(3, dtype=np.float32), 0.0).dtype == np.float32


def test_no_framework_is_imported_for_numpy_inputs():
    import subprocess
    import sys

    code = "import sys, kl_bench; kl_bench.kl_cov([0,0], [[1,0],[0,1]], [1,0], [[2,0],[0,2]]); print('torch' in sys.modules, 'jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == ["False", "False"]


def test_unknown_method():
    with pytest.raises(ValueError, match="method"):
        kl_bench.kl_vae([0.0], [0.0], method="textbook")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: kl_bench.kl_normal(0.0, -1.0, 0.0, 1.0), "scale_p must be positive"),
        (lambda: kl_bench.kl_normal(0.0, 1.0, 0.0, [1.0, 0.0]), r"scale_q must be positive \(first at batch index \(1,\)\)"),
        (lambda: kl_bench.kl_normal(np.zeros(3), 1.0, np.zeros(4), 1.0), r"do not broadcast: loc_p \(3,\), scale_p \(\), loc_q \(4,\)"),
        (lambda: kl_bench.kl_diag(np.zeros(3), np.zeros(4), 0.0, 0.0), "logvar_p"),
        (lambda: kl_bench.kl_vae(1.0, 0.0), "last axis of length k"),
        (lambda: kl_bench.kl_tril(np.zeros(3), -EYE, np.zeros(3), EYE), "tril_p has a non-positive diagonal"),
        (lambda: kl_bench.kl_tril(np.zeros(3), EYE, np.zeros(3), EYE + np.triu(EYE + 1, 1)), "tril_q is not lower triangular"),
        (lambda: kl_bench.kl_tril(np.zeros(3), EYE, np.zeros(3), np.eye(4)), "mismatched dimension k"),
        (lambda: kl_bench.kl_tril(np.zeros(4), EYE, np.zeros(3), EYE), r"loc_p has shape \(4,\) but tril_p is 3x3"),
        (lambda: kl_bench.kl_cov(np.zeros(3), EYE, np.zeros(3), np.ones((3, 2))), "cov_q must be a square matrix"),
        (lambda: kl_bench.kl_cov(np.zeros(3), EYE, np.zeros(3), -EYE), "cov_q is not positive definite"),
        (lambda: kl_bench.kl_cov(np.zeros(3), np.diag([1.0, -1.0, 1.0]), np.zeros(3), EYE), "cov_p is not positive definite"),
        (lambda: kl_bench.kl_cov(np.zeros((2, 3)), EYE, np.zeros((4, 3)), EYE), "batch shapes do not broadcast"),
        (lambda: kl_bench.kl_cov(np.zeros(3), EYE, np.zeros(3), INDEFINITE), r"^cov_q is not positive definite \(smallest eigenvalue -1\)$"),
        (lambda: kl_bench.kl_cov(np.zeros(2), EYE[:2, :2], np.zeros(2), np.ones((2, 2))),
         "^cov_q cannot be factored in float64: it is numerically singular"),
    ],
)
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_validate_false_gives_nan_instead_of_raising():
    out = kl_bench.kl_cov(np.zeros((2, 3)), np.stack([EYE, EYE]), np.zeros(3), np.stack([EYE, -EYE]), validate=False)
    assert out[0] == 0.0 and np.isnan(out[1])


def test_not_an_array():
    with pytest.raises(TypeError, match="loc must be an array or a number"):
        kl_bench.kl_vae("abc", [0.0])


def test_mixed_frameworks_are_a_type_error():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"different frameworks.*loc_p, loc_q from numpy; scale_p, scale_q from torch"):
        kl_bench.kl_normal(np.zeros(2), torch.ones(2), np.zeros(2), torch.ones(2))


def test_tensors_on_different_devices_are_a_type_error():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="different devices.*scale_p on meta"):
        kl_bench.kl_normal(torch.zeros(2), torch.ones(2, device="meta"), 0.0, 1.0)


def test_python_scalars_follow_the_tensor_dtype_and_device():
    torch = pytest.importorskip("torch")
    out = kl_bench.kl_normal(torch.zeros(2, dtype=torch.float16), 1.5, 0.0, 1.0)
    assert out.dtype == torch.float16


def test_torch_autograd_matches_the_analytic_gradient():
    torch = pytest.importorskip("torch")
    loc = torch.tensor([0.3, -1.2], dtype=torch.float64, requires_grad=True)
    logvar = torch.tensor([0.5, -0.25], dtype=torch.float64, requires_grad=True)
    kl_bench.kl_vae(loc, logvar).backward()
    np.testing.assert_allclose(loc.grad.numpy(), loc.detach().numpy(), rtol=1e-15)
    np.testing.assert_allclose(logvar.grad.numpy(), 0.5 * np.expm1(logvar.detach().numpy()), rtol=1e-15)


def test_jax_inside_user_jit_skips_raising_but_masks_invalid_values():
    jax = pytest.importorskip("jax")
    with backends.get("jax").computing("float64"):
        f = jax.jit(lambda s: kl_bench.kl_normal(0.0, s, 0.0, 1.0))
        out = np.asarray(f(jax.numpy.asarray([1.0, -1.0])))
        assert out[0] == 0.0 and np.isnan(out[1])
        with pytest.raises(ValueError, match="scale_p must be positive"):
            kl_bench.kl_normal(0.0, jax.numpy.asarray([1.0, -1.0]), 0.0, 1.0)


def test_installed_backends_always_include_numpy():
    assert backends.installed()[0] == "numpy"
    with pytest.raises(ValueError, match="unknown backend"):
        backends.get("tensorflow")


def test_jax_arrays_outside_jit_get_a_compiled_cached_kernel():
    jnp = pytest.importorskip("jax.numpy")
    from kl_bench import accel, kernels

    kernels.compiled.cache_clear()
    loc = jnp.zeros((3, 4), dtype=jnp.float32)
    with accel.use("array"):  # (on the CPU, kl_vae otherwise takes the XLA custom call, jitted too)
        kl_bench.kl_vae(loc, loc)
        kl_bench.kl_vae(loc + 1, loc)
    info = kernels.compiled.cache_info()
    assert info.misses == 1 and info.hits == 1  # compiled once, reused
    compiled = kernels.compiled(kl_bench.backends.get("jax"), "vae", "stable", True)
    assert hasattr(compiled, "lower")  # a jax.jit-compiled function, not op-by-op evaluation


def test_the_kernel_registry_chooses_by_family_method_arrays_and_choice():
    from kl_bench import accel

    numpy = backends.get("numpy")
    x32, x64 = np.zeros((2, 3), np.float32), np.zeros((2, 3))
    with accel.use("array"):
        assert accel.select(numpy, "vae", "stable", [x32, x32]) is None
    if not accel.REGISTRY["numba"].available():
        pytest.skip("numba is not installed")
    fused = accel.REGISTRY["numba"].impl()
    for choice in ("auto", "numba"):
        with accel.use(choice):
            assert accel.select(numpy, "vae", "stable", [x32, x32]) is fused
            assert accel.select(numpy, "vae", "naive", [x32, x32]) is None  # the textbook is never fused
            assert accel.select(numpy, "vae", "stable", [x64, x64]) is None  # float64 takes the array path
            assert accel.select(numpy, "cov", "stable", [x32, x32, x32, x32]) is None  # no numba kernel for cov


def test_an_unknown_kernel_is_a_clear_error():
    import os
    import subprocess
    import sys

    from kl_bench import accel

    with pytest.raises(ValueError, match="kernel must be one of auto, array, triton, xla, numba, got 'cuda'"):
        with accel.use("cuda"):
            pass
    env = dict(os.environ, KL_BENCH_KERNEL="fast")
    result = subprocess.run([sys.executable, "-c", "import kl_bench"], capture_output=True, text=True, env=env)
    assert result.returncode != 0 and "KL_BENCH_KERNEL must be one of auto, array, triton, xla, numba, got 'fast'" in result.stderr


def test_a_covariance_that_factors_gives_a_finite_kl_however_ill_conditioned():
    """cond(S_q) = 1e15 (k = 64) and a well-conditioned S_p: both factor, so the KL is finite (its
    pivots of I + M below 1/2 from rounding take the log-determinant route)."""
    from kl_bench.suite import reference

    rng = np.random.default_rng(3)
    q = np.linalg.qr(rng.normal(size=(64, 64)))[0]
    s_q = q @ np.diag(np.logspace(0, -15, 64)) @ q.T
    s_q = 0.5 * (s_q + s_q.T)
    a = rng.normal(size=(64, 64))
    s_p = a @ a.T / 64 + np.eye(64)
    computed = kl_bench.kl_cov(np.zeros(64), s_p, np.zeros(64), s_q)
    exact = float(reference.kl_cov(np.zeros(64), s_p, np.zeros(64), s_q))
    assert np.isfinite(computed) and abs(computed - exact) <= 1e-2 * exact


@pytest.mark.parametrize("value, message", [
    (None, "loc must be an array or a number, got NoneType"),
    ("abc", "loc must be an array or a number, got str"),
    ([0.0, None], "loc must be an array or a number, got list"),
    (1j, r"loc is complex \(complex128\)"),
    (np.ones(2, dtype=np.complex64), r"loc is complex \(complex64\)"),
])
def test_what_is_not_a_real_number_is_a_type_error_naming_the_argument(value, message):
    with pytest.raises(TypeError, match=message):
        kl_bench.kl_vae(value, np.zeros(2))


def test_complex_tensors_are_a_type_error():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"logvar is complex \(complex64\)"):
        kl_bench.kl_vae(torch.zeros(2), torch.zeros(2, dtype=torch.complex64))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("family", kl_bench.FAMILIES)
def test_torch_func_transforms_agree_with_autograd(family, dtype):
    """vmap, grad, jvp, jacrev and hessian, with the default arguments: inside a transform the
    kernel is traced through (array path, no data-dependent raising)."""
    torch = pytest.importorskip("torch")
    from torch.func import grad, hessian, jacrev, jvp, vmap

    from kl_bench import accel
    from kl_bench.suite import cases

    case = cases.generate(family, "generic", "float64", n=3)
    args = tuple(torch.tensor(a, dtype=getattr(torch, dtype)) for a in case.arrays)
    f = getattr(kl_bench, f"kl_{family}")

    def total(*a):
        return f(*a).sum()

    tol = dict(rtol=1e-10, atol=1e-12) if dtype == "float64" else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vmap(f)(*args), f(*args), **tol)
    with accel.use("array"):  # autograd's double backward needs the array path (the fused kernel has one backward)
        leaves = [a.clone().requires_grad_(True) for a in args]
        ref_grads = torch.autograd.grad(total(*leaves), leaves)
        ref_jacobian = torch.autograd.functional.jacobian(lambda x: f(x, *args[1:]), args[0])
        ref_hessian = torch.autograd.functional.hessian(lambda x: total(x, *args[1:]), args[0])
    for g, r in zip(grad(total, argnums=tuple(range(len(args))))(*args), ref_grads):
        torch.testing.assert_close(g, r, **tol)
    tangents = tuple(torch.ones_like(a) for a in args)
    torch.testing.assert_close(jvp(total, args, tangents)[1], sum((r * t).sum() for r, t in zip(ref_grads, tangents)), **tol)
    torch.testing.assert_close(jacrev(f, argnums=0)(*args), ref_jacobian, **tol)
    torch.testing.assert_close(hessian(total, argnums=0)(*args), ref_hessian, **tol)


def test_invalid_input_under_vmap_comes_out_nan_instead_of_raising():
    torch = pytest.importorskip("torch")
    from torch.func import vmap

    out = vmap(kl_bench.kl_normal)(torch.zeros(2), torch.tensor([1.0, -1.0]), torch.zeros(2), torch.ones(2))
    assert out[0] == 0 and torch.isnan(out[1])
    with pytest.raises(ValueError, match="scale_p must be positive"):
        kl_bench.kl_normal(torch.zeros(2), torch.tensor([1.0, -1.0]), torch.zeros(2), torch.ones(2))
