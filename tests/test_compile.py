"""torch.compile: every family compiles whole (fullgraph=True) with validate=False and agrees with
the eager call; with validate=True (the default) a compiled call breaks the graph to look at its
inputs and still raises on bad ones."""

import shutil

import pytest

import kl_bench
from kl_bench.suite import cases

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
                                reason="torch.compile on CPU needs a C++ compiler")


def _args(family, dtype):
    case = cases.generate(family, "generic", "float64", n=4)
    return tuple(torch.tensor(a, dtype=getattr(torch, dtype)) for a in case.arrays)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("family", kl_bench.FAMILIES)
def test_every_family_compiles_whole_and_agrees_with_eager(family, dtype):
    torch._dynamo.reset()
    f = getattr(kl_bench, f"kl_{family}")
    args = _args(family, dtype)
    compiled = torch.compile(lambda *a: f(*a, validate=False), fullgraph=True)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == "float64" else dict(rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(compiled(*args), f(*args), **tol)


def test_compiled_gradient_agrees_with_eager():
    torch._dynamo.reset()
    args = [a.requires_grad_(True) for a in _args("diag", "float32")]
    compiled = torch.compile(lambda *a: kl_bench.kl_diag(*a, validate=False).sum(), fullgraph=True)
    got = torch.autograd.grad(compiled(*args), args)
    want = torch.autograd.grad(kl_bench.kl_diag(*args).sum(), args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("family,bad,message", [
    ("normal", 1, "scale_p must be positive"),
    ("cov", 3, "cov_q is not positive definite"),
])
def test_compiled_with_validation_still_raises(family, bad, message):
    torch._dynamo.reset()
    f = getattr(kl_bench, f"kl_{family}")
    compiled = torch.compile(f)
    args = list(_args(family, "float64"))
    assert torch.isfinite(compiled(*args)).all()
    args[bad] = -args[bad]
    with pytest.raises(ValueError, match=message):
        compiled(*args)
