"""The package's architecture, checked: the library never imports the suite, no module imports
another in a circle, functions stay short, ``import kl_bench`` stays light, and the pytest plugin
changes nothing in a session that does not use it."""

import ast
import inspect
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kl_bench"
LIBRARY = ("kl_bench", "kl_bench.kl", "kl_bench.kernels", "kl_bench.families", "kl_bench.backends", "kl_bench.accel",
           "kl_bench.accel.numba_cpu", "kl_bench.accel.numba_lowrank", "kl_bench.accel.triton_gpu", "kl_bench.accel.triton_kernels",
           "kl_bench.accel.xla_ffi")
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


MODULES = _modules()


def _imports(name: str, tree: ast.Module) -> set[str]:
    """The kl_bench modules that ``name`` imports, at the top or inside a function."""
    package = name if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists() else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, tree) for name, tree in MODULES.items()}


def test_the_library_never_imports_the_suite():
    for name in LIBRARY:
        # kl_bench/__init__ offers kl_bench.check, which imports the checker when first asked for.
        allowed = {"kl_bench.suite.checker", "kl_bench.suite"} if name == "kl_bench" else set()
        suite = {m for m in GRAPH[name] if m.startswith("kl_bench.suite")} - allowed
        assert not suite, f"{name} imports {suite}"
        assert not {m for m in GRAPH[name] if m in ("kl_bench.cli", "kl_bench.pytest_plugin")}


def test_no_module_imports_another_in_a_circle():
    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in GRAPH[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    # A package imported for one of its submodules is not a cycle through that package's __init__,
    # unless the __init__ itself imports back: the edges here are the ones written in the code.
    cycles = [name for name in GRAPH if name in reach(name)]
    assert not cycles, f"modules in an import cycle: {cycles}"


def test_a_cycle_would_be_found():
    """The graph above sees imports inside functions too (the kind of cycle that hides there)."""
    assert "kl_bench.suite.checker" in GRAPH["kl_bench"]
    assert "kl_bench.kernels" in GRAPH["kl_bench.accel.numba_cpu"]


def test_no_function_is_longer_than_60_lines():
    long = []
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name} ({length} lines)")
    assert not long, long


def test_each_family_is_described_once():
    """The families table is the only place that lists the families' arguments."""
    from kl_bench import families, kernels, kl
    from kl_bench.suite import cases, reference

    assert kl.FAMILIES == families.NAMES == tuple(kernels.KERNELS) == tuple(reference.MP_FUNCTIONS)
    assert set(cases.DEFAULT_N) == set(families.NAMES)
    for fam in families.TABLE.values():
        assert tuple(inspect.signature(getattr(kl, f"kl_{fam.name}")).parameters)[: len(fam.args)] == fam.names


def test_import_and_a_numpy_call_load_nothing_heavy():
    heavy = ("pandas", "mpmath", "matplotlib", "pyarrow", "dask", "distributed", "jax", "torch", "numba", "kl_bench.suite")
    code = ("import sys, numpy as np, kl_bench; kl_bench.kl_cov([0, 0], [[1, 0], [0, 1]], [1, 0], [[2, 0], [0, 2]]); "
            "kl_bench.kl_vae(np.zeros((2, 3)), np.zeros((2, 3))); "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_plugin_changes_nothing_in_an_unrelated_project(tmp_path):
    """A pytest session elsewhere, with kl-bench installed: the same environment, modules and
    warning filters with the plugin as without it (and the plugin is loaded)."""
    (tmp_path / "test_other.py").write_text(textwrap.dedent("""
        import os, sys, warnings

        def test_fingerprint(request):
            print("LOADED", request.config.pluginmanager.has_plugin("kl_bench"))
            print("XLA_FLAGS", os.environ.get("XLA_FLAGS"))
            print("MODULES", sorted(m for m in ("jax", "torch", "pandas", "mpmath", "numba", "kl_bench.suite")
                                    if m in sys.modules))
            print("WARNINGS", warnings.filters)
    """))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}

    def session(*extra):
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *extra, "test_other.py"],
                                cwd=tmp_path, capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in result.stdout.splitlines()
                if line.split(" ", 1)[0] in ("LOADED", "XLA_FLAGS", "MODULES", "WARNINGS")}

    with_plugin, without = session(), session("-p", "no:kl_bench")
    assert with_plugin.pop("LOADED") == "True" and without.pop("LOADED") == "False"
    assert with_plugin == without
    assert with_plugin["XLA_FLAGS"] == "None" and with_plugin["MODULES"] == "[]"


@pytest.mark.parametrize("option", ["--kl-backend=numpy", "--kl-device=cpu"])
def test_the_plugin_applies_its_settings_when_its_options_are_used(tmp_path, option):
    (tmp_path / "test_other.py").write_text("import os\n\ndef test_flags():\n    print('XLA_FLAGS', os.environ.get('XLA_FLAGS'))\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", option, "test_other.py"],
                            cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "concurrency_optimized_scheduler=false" in result.stdout


def test_the_baseline_goes_to_the_checkout_or_else_under_the_current_directory(tmp_path):
    from kl_bench.suite import baseline

    assert baseline.default_path() == PACKAGE.parent / "reports" / "accuracy-baseline.csv"
    site = tmp_path / "site-packages"
    shutil.copytree(PACKAGE, site / "kl_bench", ignore=shutil.ignore_patterns("__pycache__"))
    code = "from kl_bench.suite import baseline; print(baseline.default_path())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(site)}, check=True).stdout
    assert out.strip() == "reports/accuracy-baseline.csv"  # relative: wherever the command runs
