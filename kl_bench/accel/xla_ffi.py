"""An XLA custom call for the VAE and diagonal families on JAX's CPU backend: one pass over memory
where XLA:CPU runs each operation of the stable form as its own pass (docs/design.md, "JAX on
CPU").

The handler is a numba ``@cfunc`` that XLA calls with its FFI call frame (``XLA_FFI_CallFrame``
of ``xla/ffi/api/c_api.h``, API 0.x); no C compiler is involved. It reads the frame at the offsets
below, answers the metadata query that registration sends, and in the execute stage computes each
row in float64 and stores it rounded once to the input dtype. float32 rows use the fused elements
of ``numba_cpu.py`` (in loops of their own: numba_cpu's row loops, called from the handler,
made a small call several times slower); float64 rows the series of ``kernels.half_phi`` on (-1, 2) and an exp
accurate to float64 outside, selected per element so that LLVM vectorises both.

A row whose float64 sum is not finite (NaN or an infinite input, or an exponent beyond the range
handled here) is recomputed by the array path, so special values behave exactly as there. The
gradient is the pure-JAX derivative (``jax.custom_jvp``); ``vmap`` broadcasts the arguments
(``vmap_method="broadcast_all"``); on other platforms ``jax.lax.platform_dependent`` takes the
array path. ``jax.export`` needs the custom call allowed
(``disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(name)]``, names from
``target(family, dtype)``), or the array path (``kl_bench.accel.use("array")`` while exporting).

Everything is guarded: a jaxlib without ``jax.ffi``, a frame whose struct sizes differ from the
layout below, or a registration that fails leaves the array path in place.
"""

from __future__ import annotations

import functools
import math
import warnings
from types import SimpleNamespace

from .. import backends, kernels
from .numba_cpu import _ELEMENT_FASTMATH, _LN2_HI, _LN2_LO, _LOG2E, _SUM_FASTMATH, _elements, float_from_bits

DTYPES = ("float32", "float64")

# XLA_FFI_CallFrame on a 64-bit platform: struct_size, extension_start, api, ctx, stage (+pad),
# args {struct_size, extension_start, size, types, args}, rets {the same}, attrs, future.
FRAME_SIZE = 168  # XLA_FFI_CallFrame_STRUCT_SIZE: up to attrs
FRAME_EXTENSION, FRAME_STAGE = 8, 32
ARGS_SIZE, ARGS_ARRAY = 40 + 16, 40 + 32
RETS_ARRAY = 80 + 32
ARGS_STRUCT_SIZE = 40
# XLA_FFI_Buffer: struct_size, extension_start, dtype (+pad), data, rank, dims.
BUFFER_SIZE, BUFFER_DTYPE, BUFFER_DATA, BUFFER_RANK, BUFFER_DIMS = 48, 16, 24, 32, 40
F32, F64 = 11, 12  # XLA_FFI_DataType
EXECUTE = 3  # XLA_FFI_ExecutionStage_EXECUTE
METADATA = 1  # XLA_FFI_Extension_Metadata
# XLA_FFI_Metadata_Extension: extension base (24 bytes), then XLA_FFI_Metadata* at 24. In
# XLA_FFI_Metadata: struct_size, then api_version {struct_size, extension_start, major, minor}, traits.
METADATA_POINTER = 24
API_VERSION, API_VERSION_SIZE, API_MAJOR, API_MINOR = 8, 24, 0, 3
_TRAITS = 32

_PHI_COEFFS = tuple(kernels.HALF_PHI_COEFFS["float64"])
_EXP_COEFFS = tuple(1.0 / math.factorial(k) for k in range(2, 15))  # r^15/15! < 1e-19 for |r| <= ln2/2
_EXP_RANGE = 700.0  # |x| beyond which the exp below is not used (its 2^n would leave the exponent range)
_PARALLEL_MIN = 1 << 16  # elements below which one thread beats starting numba's pool


def target(family: str, dtype: str) -> str:
    """The custom call's name for ``family`` in ``dtype``."""
    return f"kl_bench_{family}_{dtype}"


@functools.cache
def available() -> bool:
    try:
        import jax.ffi  # noqa: F401
    except ImportError:
        return False
    return True


def takes(be, arrays, named=False) -> bool:
    return be.name == "jax" and be.dtype_name(arrays[0].dtype) in DTYPES and available()


def kl(be, family, arrays, check):
    """(KL, {}): the custom call on the CPU (the array path elsewhere), differentiable."""
    return _function(family)(*arrays), {}


@functools.cache
def _function(family):
    import jax
    import jax.numpy as jnp

    be = backends.get("jax")
    array_path = functools.partial(kernels.KERNELS[family], be, method="stable", check=False)

    def fused(*arrays):
        dtype = be.dtype_name(arrays[0].dtype)
        if not _registered(family, dtype):
            return array_path(*arrays)[0]
        shape = jnp.broadcast_shapes(*(a.shape for a in arrays))
        arrays = [jnp.broadcast_to(a, shape) for a in arrays]
        out_type = jax.ShapeDtypeStruct(shape[:-1], arrays[0].dtype)
        out = jax.ffi.ffi_call(target(family, dtype), out_type, vmap_method="broadcast_all")(*arrays)
        # rows that held NaN or infinity (or exponents out of range) come out non-finite: redo them
        return jax.lax.cond(jnp.all(jnp.isfinite(out)), lambda: out, lambda: jnp.where(jnp.isfinite(out), out, array_path(*arrays)[0]))

    @jax.custom_jvp
    def kl_fn(*arrays):
        return jax.lax.platform_dependent(*arrays, cpu=fused, default=lambda *a: array_path(*a)[0])

    @kl_fn.defjvp
    def kl_jvp(primals, tangents):
        value = kl_fn(*primals)
        derivatives = kernels.derivatives(be, family, primals)
        return value, sum(jnp.sum(d * t, axis=-1) for d, t in zip(derivatives, tangents))

    return jax.jit(kl_fn)


@functools.cache
def _registered(family, dtype) -> bool:
    """Compile the handler and register it with XLA, once; False where that fails."""
    try:
        import jax

        jax.ffi.register_ffi_target(target(family, dtype), jax.ffi.pycapsule(_handler(family, dtype).address), platform="cpu", api_version=1)
    except Exception as exc:  # an XLA or numba without what this needs: the array path stays
        warnings.warn(f"kl_bench: the XLA custom call for {family} in {dtype} could not be set up ({exc}); "
                      "the array path runs instead", RuntimeWarning, stacklevel=2)
        return False
    return True


def _horner(jit, coeffs):
    """The polynomial sum_i coeffs[i] x^i as one jitted expression: numba keeps a loop over a
    tuple of coefficients as a loop, which does not vectorise."""
    expr = repr(coeffs[-1])
    for c in reversed(coeffs[:-1]):
        expr = f"({expr}) * x + {c!r}"
    namespace = {}
    exec(f"def polynomial(x):\n    return {expr}\n", namespace)
    return jit(namespace["polynomial"])


@functools.cache
def _memory():
    """numba intrinsics for raw memory: 64- and 32-bit loads and stores at an address, pointer and
    address conversions."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    def _loader(bits):
        @intrinsic
        def load(typingctx, address):
            def codegen(context, builder, sig, args):
                return builder.load(builder.inttoptr(args[0], ir.IntType(bits).as_pointer()))
            return types.int64(types.int64) if bits == 64 else types.int32(types.int64), codegen
        return load

    def _storer(bits):
        @intrinsic
        def store(typingctx, address, value):
            def codegen(context, builder, sig, args):
                value = builder.trunc(args[1], ir.IntType(bits)) if bits < 64 else args[1]
                builder.store(value, builder.inttoptr(args[0], ir.IntType(bits).as_pointer()))
                return context.get_dummy_value()
            return types.none(types.int64, types.int64), codegen
        return store

    load64, load32, store64, store32 = _loader(64), _loader(32), _storer(64), _storer(32)

    @intrinsic
    def address_of(typingctx, pointer):
        def codegen(context, builder, sig, args):
            return builder.ptrtoint(args[0], ir.IntType(64))
        return types.int64(types.voidptr), codegen

    @intrinsic
    def pointer_to(typingctx, address):
        def codegen(context, builder, sig, args):
            return builder.inttoptr(args[0], ir.IntType(8).as_pointer())
        return types.voidptr(types.int64), codegen

    return SimpleNamespace(load64=load64, load32=load32, store64=store64, store32=store32, address_of=address_of,
                           pointer_to=pointer_to)


@functools.cache
def _elements64():
    """The float64 element functions: exp, phi/2 on and off the series' interval, TwoSum's error,
    the mean term."""
    import numba

    load_bits_as_float = float_from_bits()
    element = numba.njit(fastmath=_ELEMENT_FASTMATH)
    phi_series, exp_series = _horner(element, _PHI_COEFFS), _horner(element, _EXP_COEFFS)

    @element
    def exp64(x):
        """e^x for |x| <= _EXP_RANGE, to about an ulp: 2^n e^r, e^r by its Taylor series."""
        n = math.floor(x * _LOG2E + 0.5)
        r = (x - n * _LN2_HI) - n * _LN2_LO
        q = exp_series(r)
        two_n = load_bits_as_float((n + 1023) << 52)
        return two_n * (1.0 + (r + r * r * q))

    # float64 rows in three vectorised loops (one polynomial each: LLVM does not vectorise a loop
    # body holding both): phi's series on (-1, 2), phi's exp forms outside, the mean term. An
    # exponent beyond _EXP_RANGE makes the term NaN, for the array path to redo (a select: sqrt of
    # a negative number, numba's way to get NaN, stops the vectoriser).
    @element
    def inside(x):
        return (x > -1.0) & (x < 2.0)

    @element
    def half_phi_series(x):
        xs = x if inside(x) else 0.0
        return xs * xs * phi_series(xs)

    @element
    def half_phi_outside(x):
        # every value computed, then selected: branches around the computations stop the vectoriser
        within = inside(x)
        e = exp64(0.0 if within else min(max(x, -_EXP_RANGE), _EXP_RANGE))
        below = 0.5 * e + (-0.5 - 0.5 * x)
        above = (0.5 * e - 0.5) - 0.5 * x
        out = below if x <= -1.0 else above
        return (0.0 if within else out) + (0.0 if abs(x) <= _EXP_RANGE else math.nan)

    @element
    def rounding_error(a, b, x):
        """The rounding error of x = a - b (TwoSum)."""
        virtual = a - x
        return (a - (x + virtual)) + (virtual - b)

    @element
    def half_scaled_square(dmu, logvar):
        e = exp64(min(max(-logvar, -_EXP_RANGE), _EXP_RANGE))
        term = (0.5 * dmu) * dmu * e + (0.0 if abs(logvar) <= _EXP_RANGE else math.nan)
        return 0.0 if dmu == 0.0 else term

    return SimpleNamespace(inside=inside, half_phi_series=half_phi_series, half_phi_outside=half_phi_outside,
                           rounding_error=rounding_error, half_scaled_square=half_scaled_square)


@functools.cache
def _rows():
    """{name: (serial, parallel)}: the row loops, each row's sum in float64."""
    import numba

    e = _elements64()
    inside, half_phi_series, half_phi_outside = e.inside, e.half_phi_series, e.half_phi_outside
    rounding_error, half_scaled_square = e.rounding_error, e.half_scaled_square

    # Rows are read through row slices: numba's negative-index handling would turn a[i, j] loads
    # into gathers.
    def vae64(loc, logvar, out):
        for i in numba.prange(loc.shape[0]):
            m, lv = loc[i], logvar[i]
            total = 0.0
            for j in range(m.shape[0]):
                total += half_phi_series(lv[j]) + (0.5 * m[j]) * m[j]
            for j in range(m.shape[0]):
                total += half_phi_outside(lv[j])
            out[i] = total

    def diag64(loc_p, logvar_p, loc_q, logvar_q, out):
        # phi(x + e) = phi(x) + e expm1(x), e the rounding error of x, as kernels.kl_diag
        for i in numba.prange(loc_p.shape[0]):
            mp, lp, mq, lq = loc_p[i], logvar_p[i], loc_q[i], logvar_q[i]
            total = 0.0
            for j in range(mp.shape[0]):
                x = lp[j] - lq[j]
                h = half_phi_series(x)
                correction = rounding_error(lp[j], lq[j], x) * (h + 0.5 * x)
                total += h + (correction if inside(x) else 0.0)
            for j in range(mp.shape[0]):
                x = lp[j] - lq[j]
                h = half_phi_outside(x)
                err = rounding_error(lp[j], lq[j], x)
                correction = err * (h + 0.5 * x)
                total += h + (0.0 if inside(x) | (err == 0.0) else correction)
            for j in range(mp.shape[0]):
                total += half_scaled_square(mp[j] - mq[j], lq[j])
            out[i] = total

    return _jitted({"vae64": vae64, "diag64": diag64}) | _rows32()


def _jitted(loops):
    import numba

    return {name: (numba.njit(fastmath=_SUM_FASTMATH)(fn), numba.njit(fastmath=_SUM_FASTMATH, parallel=True)(fn))
            for name, fn in loops.items()}


def _rows32():
    """The float32 row loops: numba_cpu's elements, computed in float64."""
    import numba
    import numpy as np

    _, exp32, half_phi32 = _elements()

    def vae32(loc, logvar, out):
        for i in numba.prange(loc.shape[0]):
            m, lv = loc[i], logvar[i]
            total = 0.0
            for j in range(m.shape[0]):
                mj = np.float64(m[j])
                total += half_phi32(np.float64(lv[j])) + 0.5 * mj * mj
            out[i] = total

    def diag32(loc_p, logvar_p, loc_q, logvar_q, out):
        for i in numba.prange(loc_p.shape[0]):
            mp, lp, mq, lq = loc_p[i], logvar_p[i], loc_q[i], logvar_q[i]
            total = 0.0
            for j in range(mp.shape[0]):
                dmu = np.float64(mp[j]) - np.float64(mq[j])  # exact in float64
                q = np.float64(lq[j])
                total += half_phi32(np.float64(lp[j]) - q) + 0.5 * dmu * dmu * exp32(-q)
            out[i] = total

    return _jitted({"vae32": vae32, "diag32": diag32})


@functools.cache
def _frame_reader():
    """frame_arrays(frame, count): what a call frame holds, read at the offsets above."""
    import numba

    m = _memory()
    load64, load32, store64, store32 = m.load64, m.load32, m.store64, m.store32

    @numba.njit
    def frame_arrays(frame, count):
        """(dtype, rows, k, data addresses of the count arguments, output address), or dtype 0
        where the frame is not for this handler (a metadata query, another stage, another layout)."""
        if load64(frame) < FRAME_SIZE:
            return 0, 0, 0, (0, 0, 0, 0), 0
        extension = load64(frame + FRAME_EXTENSION)
        if extension != 0:
            if load32(extension + 8) == METADATA:
                metadata = load64(extension + METADATA_POINTER)
                store64(metadata + API_VERSION, API_VERSION_SIZE)
                store64(metadata + API_VERSION + 8, 0)
                store32(metadata + API_VERSION + 16, API_MAJOR)
                store32(metadata + API_VERSION + 20, API_MINOR)
                store32(metadata + _TRAITS, 0)
            return 0, 0, 0, (0, 0, 0, 0), 0
        if load32(frame + FRAME_STAGE) != EXECUTE or load64(frame + 40) < ARGS_STRUCT_SIZE or load64(frame + ARGS_SIZE) != count:
            return 0, 0, 0, (0, 0, 0, 0), 0
        args = load64(frame + ARGS_ARRAY)
        first = load64(args)
        if load64(first) < BUFFER_SIZE:
            return 0, 0, 0, (0, 0, 0, 0), 0
        rank = load64(first + BUFFER_RANK)
        dims = load64(first + BUFFER_DIMS)
        k = load64(dims + 8 * (rank - 1)) if rank > 0 else 1
        rows = 1
        for d in range(rank - 1):
            rows *= load64(dims + 8 * d)
        data = [0, 0, 0, 0]
        for a in range(count):
            data[a] = load64(load64(args + 8 * a) + BUFFER_DATA)
        out = load64(load64(load64(frame + RETS_ARRAY)) + BUFFER_DATA)
        return load32(first + BUFFER_DTYPE), rows, k, (data[0], data[1], data[2], data[3]), out

    return frame_arrays


@functools.cache
def _handler(family, dtype):
    """The cfunc that XLA calls with its call frame for ``family`` in ``dtype`` (each compiled only
    when first needed: the float64 loops take seconds)."""
    import numba
    import numpy as np
    from numba import types

    address_of, pointer_to = _memory().address_of, _memory().pointer_to
    frame_arrays = _frame_reader()
    serial, parallel = _rows()[family + ("32" if dtype == "float32" else "64")]
    np_dtype, code = (np.float32, F32) if dtype == "float32" else (np.float64, F64)

    @numba.njit
    def frame(frame_pointer, count):
        """(rows, k, data addresses, output address), rows -1 for a frame of another kind (a
        metadata query, another dtype)."""
        found, rows, k, data, out = frame_arrays(address_of(frame_pointer), count)
        return (rows if found == code else -1), k, data, out

    @numba.njit
    def argument(data, i, rows, k):
        return numba.carray(pointer_to(data[i]), (rows, k), np_dtype)

    @numba.njit
    def store(out, result):  # rounded once to the dtype
        numba.carray(pointer_to(out), result.shape[0], np_dtype)[:] = result

    if family == "vae":
        @numba.cfunc(types.voidptr(types.voidptr))
        def handler(frame_pointer):
            rows, k, data, out = frame(frame_pointer, 2)
            if rows >= 0:
                result = np.empty(rows)
                a, b = argument(data, 0, rows, k), argument(data, 1, rows, k)
                if rows > 1 and rows * k >= _PARALLEL_MIN:
                    parallel(a, b, result)
                else:
                    serial(a, b, result)
                store(out, result)
            return pointer_to(0)
    else:
        @numba.cfunc(types.voidptr(types.voidptr))
        def handler(frame_pointer):
            rows, k, data, out = frame(frame_pointer, 4)
            if rows >= 0:
                result = np.empty(rows)
                a, b = argument(data, 0, rows, k), argument(data, 1, rows, k)
                c, d = argument(data, 2, rows, k), argument(data, 3, rows, k)
                if rows > 1 and rows * k >= _PARALLEL_MIN:
                    parallel(a, b, c, d, result)
                else:
                    serial(a, b, c, d, result)
                store(out, result)
            return pointer_to(0)

    return handler
