"""The XLA custom call for JAX on the CPU (kl_bench.accel.xla_ffi) beyond the shared suites that
run it as the ``xla`` and ``jax.jit`` modes: it is what a jitted call compiles to, and jit, grad,
vmap and jax.export keep working."""

import numpy as np
import pytest

import kl_bench
from kl_bench import accel

jax = pytest.importorskip("jax")
pytest.importorskip("numba")
jnp = jax.numpy
xla_ffi = pytest.importorskip("kl_bench.accel.xla_ffi")
pytestmark = pytest.mark.skipif(not xla_ffi.available(), reason="this jaxlib has no usable XLA FFI")


def _args(family, dtype, shape=(5, 7)):
    rng = np.random.default_rng(0)
    return [jnp.asarray(rng.normal(size=shape).astype(dtype)) for _ in range(2 if family == "vae" else 4)]


@pytest.mark.parametrize("family", ["vae", "diag"])
def test_a_jitted_call_compiles_to_the_custom_call(family):
    f = getattr(kl_bench, f"kl_{family}")
    hlo = jax.jit(lambda *a: f(*a)).lower(*_args(family, "float32")).as_text()
    assert xla_ffi.target(family, "float32") in hlo
    with accel.use("array"):  # the choice in force when the function is traced (jax.jit caches traces per function)
        assert xla_ffi.target(family, "float32") not in jax.jit(lambda *a: f(*a)).lower(*_args(family, "float32")).as_text()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("family", ["vae", "diag"])
def test_jit_grad_and_vmap_agree_with_the_array_path(family, dtype):
    f = getattr(kl_bench, f"kl_{family}")
    tol = dict(rtol=1e-13, atol=1e-13) if dtype == "float64" else dict(rtol=1e-6, atol=1e-6)
    with jax.enable_x64(dtype == "float64"):
        args = _args(family, dtype)
        total = lambda *a: f(*a).sum()  # noqa: E731
        argnums = tuple(range(len(args)))
        got = (jax.jit(f)(*args), jax.grad(total, argnums)(*args), jax.vmap(f)(*args), jax.jit(jax.vmap(jax.grad(total, argnums)))(*args))
        with accel.use("array"):
            want = (jax.jit(f)(*args), jax.grad(total, argnums)(*args), jax.vmap(f)(*args), jax.jit(jax.vmap(jax.grad(total, argnums)))(*args))
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), **tol)


def test_special_values_take_the_array_path_inside_the_call():
    loc = jnp.zeros((3, 4))
    logvar = jnp.array([[0.0, 1.0, 2.0, 3.0], [jnp.inf, 0.0, 0.0, 0.0], [jnp.nan, 0.0, 0.0, 0.0]])
    out = np.asarray(jax.jit(kl_bench.kl_vae)(loc, logvar))
    with accel.use("array"):
        want = np.asarray(kl_bench.kl_vae(loc, logvar))
    np.testing.assert_array_equal(np.isfinite(out), [True, False, False])
    assert out[1] == np.inf and np.isnan(out[2]) and out[0] == pytest.approx(want[0], rel=1e-6)


def test_jax_export_with_the_custom_call_allowed_or_the_array_path():
    from jax import export

    args = _args("vae", "float32")
    want = np.asarray(kl_bench.kl_vae(*args))
    allowed = [export.DisabledSafetyCheck.custom_call(xla_ffi.target("vae", "float32"))]
    exported = export.export(jax.jit(lambda *a: kl_bench.kl_vae(*a)), disabled_checks=allowed)(*args)
    np.testing.assert_allclose(np.asarray(exported.call(*args)), want, rtol=1e-6)
    with pytest.raises(ValueError, match="custom call"):
        export.export(jax.jit(lambda *a: kl_bench.kl_vae(*a)))(*args)
    with accel.use("array"):
        plain = export.export(jax.jit(lambda *a: kl_bench.kl_vae(*a)))(*args)
    np.testing.assert_allclose(np.asarray(plain.call(*args)), want, rtol=1e-6)
