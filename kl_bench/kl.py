"""The public KL functions: argument handling around ``kl_bench.kernels``.

Each call finds the framework of its array arguments, checks their shapes, devices and dtypes,
converts Python scalars and lists, broadcasts, computes half precision in float32, runs the kernel
(compiled and cached on JAX), or the accelerated kernel that ``kl_bench.accel`` selects for the
arrays, and raises ``ValueError`` for invalid values unless
``validate=False``.
"""

from __future__ import annotations

import numpy as np

from . import accel, backends, blocks, families, kernels
from .backends import HALF_DTYPES

METHODS = ("stable", "naive")
FAMILIES = families.NAMES


def kl_normal(loc_p, scale_p, loc_q, scale_q, *, method="stable", validate=True):
    """KL(N(loc_p, scale_p^2) || N(loc_q, scale_q^2)), elementwise with broadcasting."""
    return _call("normal", (loc_p, scale_p, loc_q, scale_q), method, validate)


def kl_diag(loc_p, logvar_p, loc_q, logvar_q, *, method="stable", validate=True):
    """KL between diagonal Gaussians given means and log-variances; sums the last axis."""
    return _call("diag", (loc_p, logvar_p, loc_q, logvar_q), method, validate)


def kl_vae(loc, logvar, *, method="stable", validate=True):
    """KL(N(loc, diag exp(logvar)) || N(0, I)), the VAE term; sums the last axis."""
    return _call("vae", (loc, logvar), method, validate)


def kl_tril(loc_p, tril_p, loc_q, tril_q, *, method="stable", validate=True):
    """KL between full-covariance Gaussians given lower Cholesky factors (..., k, k)."""
    return _call("tril", (loc_p, tril_p, loc_q, tril_q), method, validate)


def kl_cov(loc_p, cov_p, loc_q, cov_q, *, method="stable", validate=True):
    """KL between full-covariance Gaussians given covariance matrices (..., k, k)."""
    return _call("cov", (loc_p, cov_p, loc_q, cov_q), method, validate)


def kl_lowrank(loc_p, cov_factor_p, cov_diag_p, loc_q, cov_factor_q, cov_diag_q, *, method="stable", validate=True):
    """KL between Gaussians with covariances W W^T + diag(d) (torch's LowRankMultivariateNormal):
    factors (..., k, r), diagonals (..., k); the two ranks may differ. O(k r^2)."""
    return _call("lowrank", (loc_p, cov_factor_p, cov_diag_p, loc_q, cov_factor_q, cov_diag_q), method, validate)


def _call(family, values, method, validate):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    fam = families.TABLE[family]
    be = _backend_of(fam.names, values)
    arrays, result_dtype = _convert(be, fam.names, values)
    arrays = _broadcast(be, fam, arrays)
    traced = any(be.is_traced(x) for x in arrays)
    if (kernel := accel.select(be, family, method, arrays, traced)) is not None:
        kl, problems = accel.run(kernel, be, family, arrays, validate)
    elif traced:  # inside the caller's jax.jit, torch.compile or torch.func transform: trace the kernel into it
        kl, problems = kernels.KERNELS[family](be, *arrays, method=method, check=validate)
    else:
        kernel = kernels.compiled(be, family, method, validate)
        along = blocks.plan(fam, arrays) if fam.in_blocks and be.in_blocks and be.device_kind(arrays[0]) == "cpu" else None
        kl, problems = blocks.run(be, fam, kernel, arrays, along) if along else kernel(*arrays)
    if validate and (not traced or be.looks_at_traced_values(arrays[0])):
        _raise_problems(be, problems, dict(zip(fam.names, arrays)))
    if be.dtype_name(kl.dtype) != be.dtype_name(result_dtype):
        kl = be.xp.astype(kl, result_dtype)
    return kl


def _backend_of(names, values):
    if all(type(x) is np.ndarray for x in values):  # the common case, decided cheaply
        return backends.get("numpy")
    owners = {}
    for name, x in zip(names, values):
        b = backends.of(x)
        if b is not None:
            owners.setdefault(b.name, []).append(name)
    if len(owners) > 1:
        mixed = "; ".join(f"{', '.join(args)} from {fw}" for fw, args in owners.items())
        raise TypeError(f"arrays of different frameworks in one call ({mixed}); convert them to one")
    return backends.get(next(iter(owners), "numpy"))


def _convert(be, names, values):
    """Arrays of ``be`` in the compute dtype, and the dtype of the result."""
    given = {name: x for name, x in zip(names, values) if be.owns(x)}
    for name, x in given.items():
        _real_numbers(name, be.dtype_name(x.dtype))
    if be.name != "numpy":  # NumPy has one device
        devices = {name: be.device_of(x) for name, x in given.items()}
        if len({d for d in devices.values() if d is not None}) > 1:
            listed = ", ".join(f"{name} on {d}" for name, d in devices.items())
            raise TypeError(f"arrays on different devices in one call ({listed}); move them to one")
    device = next(iter(given.values())).device if given and be.name == "torch" else None
    result_dtype = be.result_dtype(list(given.values())) if given else be.dtype("float64")
    compute = be.dtype("float32") if be.dtype_name(result_dtype) in HALF_DTYPES else result_dtype
    arrays = []
    for name, x in zip(names, values):
        if not be.owns(x):
            try:
                found = np.asarray(x)
            except (TypeError, ValueError) as err:  # ragged lists and the like
                raise TypeError(f"{name} must be an array or a number, got {type(x).__name__}") from err
            _real_numbers(name, found.dtype.name, type(x).__name__)
            x = found.astype(np.float64)
        same = be.name == "numpy" and type(x) is np.ndarray and x.dtype == compute
        arrays.append(x if same else be.asarray(x, dtype=compute, device=device))
    return arrays, result_dtype


def _real_numbers(name, dtype_name, given=None):
    """Gaussians have real parameters: integers and booleans promote, anything else is refused
    (None or strings would become NaN, complex numbers would lose their imaginary part)."""
    if dtype_name.startswith(("float", "bfloat", "int", "uint", "bool")):
        return
    if dtype_name.startswith("complex"):
        raise TypeError(f"{name} is complex ({dtype_name}); a Gaussian's parameters are real numbers")
    raise TypeError(f"{name} must be an array or a number, got {given or dtype_name}")


def _broadcast(be, fam, arrays):
    names, core = fam.names, dict(zip(fam.names, fam.core_ndims))
    shapes = {name: tuple(x.shape) for name, x in zip(names, arrays)}
    if not fam.full:
        try:
            shape = backends.common_shape(shapes.values())
        except ValueError:
            raise ValueError(f"shapes do not broadcast: {_listing(shapes)}") from None
        if not fam.elementwise and len(shape) == 0:
            raise ValueError(f"{names[0]} and the others must have a last axis of length k, got {_listing(shapes)}")
        return arrays  # elementwise operations broadcast by themselves
    kinds = {a.name: a.kind for a in fam.args}
    mat_names = [n for n in names if core[n] == 2]
    for n in mat_names:
        s = shapes[n]
        if kinds[n] == families.LOW_RANK:
            if len(s) < 2:
                raise ValueError(f"{n} must be a k x r matrix or a batch of them (..., k, r), got shape {s}")
        elif len(s) < 2 or s[-1] != s[-2]:
            raise ValueError(f"{n} must be a square matrix or a batch of them (..., k, k), got shape {s}")
    k = shapes[mat_names[0]][-2]
    if shapes[mat_names[1]][-2] != k:
        raise ValueError(f"mismatched dimension k: {_listing({n: shapes[n] for n in mat_names})}")
    for n in names:
        if core[n] == 1 and len(shapes[n]) >= 1 and shapes[n][-1] not in (1, k):
            size = f"{k}x{k}" if kinds[mat_names[0]] != families.LOW_RANK else f"{k}x{shapes[mat_names[0]][-1]}"
            raise ValueError(f"mismatched dimension k: {n} has shape {shapes[n]} but {mat_names[0]} is {size}")
    batches = {n: s[: len(s) - core[n]] if len(s) >= core[n] else () for n, s in shapes.items()}
    try:
        batch = np.broadcast_shapes(*batches.values())
    except ValueError:
        raise ValueError(f"batch shapes do not broadcast: {_listing(shapes)}") from None
    xp = be.xp
    return [xp.broadcast_to(x, batch + ((k,) if core[n] == 1 else (k, shapes[n][-1]))) for n, x in zip(names, arrays)]


def _listing(shapes):
    return ", ".join(f"{name} {tuple(s)}" for name, s in shapes.items())


def _raise_problems(be, problems, named):
    for (name, message), mask in problems.items():
        if be.any(mask):
            where = np.argwhere(np.atleast_1d(be.to_numpy(mask)))
            first = tuple(int(i) for i in where[0])
            at = f" (first at batch index {first})" if mask.ndim else ""
            if message == kernels.NOT_POSITIVE_DEFINITE:
                matrix = be.to_numpy(named[name])
                message = _why_not_factored(matrix[first] if mask.ndim else matrix, be.dtype_name(named[name].dtype))
            raise ValueError(f"{name} {message}{at}")


def _why_not_factored(matrix: np.ndarray, dtype: str) -> str:
    """Why a covariance matrix's Cholesky factorisation failed: it is indefinite, or positive
    definite as far as float64 eigenvalues tell but too ill-conditioned to factor in ``dtype``."""
    eigenvalues = np.linalg.eigvalsh(0.5 * (matrix + matrix.T))
    smallest, largest = eigenvalues[0], eigenvalues[-1]
    noise = len(eigenvalues) * np.finfo(np.float64).eps * abs(largest)
    if not np.isfinite(eigenvalues).all() or smallest < -noise or largest <= 0:
        return f"{kernels.NOT_POSITIVE_DEFINITE} (smallest eigenvalue {smallest:.3g})"
    cond = f"{largest / smallest:.2g}" if smallest > noise else f"at least {abs(largest) / noise:.2g}"
    return f"cannot be factored in {dtype}: it is numerically singular (condition number {cond})"
