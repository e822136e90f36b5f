"""The package's layers: no import cycles among seqmodels/ and data_modules/, cells that know
nothing of Lightning, data that knows nothing of models, run folders owned by one module."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("seqmodels", "data_modules")


def module_files(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """module name -> its file (a package's name -> its __init__.py)."""
    files = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_names(path: Path, module: str) -> set[str]:
    """The absolute dotted names ``path`` (the code of ``module``) imports, at any depth of its
    code (function-local imports included): ``import a.b``, ``from a.b import c`` (a.b and a.b.c,
    in case c is a module), relative imports resolved, ``importlib.import_module("a.b")``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return names


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules that its imports execute. Importing ``a.b.c`` runs
    ``a/__init__.py``, ``a/b/__init__.py`` and then ``a/b/c.py``, so it is an edge to each of
    them, except to the packages the importer lies in (they began running before it)."""
    files = module_files(root, packages)
    graph = {}
    for module, path in files.items():
        runs = set()
        for name in imported_names(path, module):
            parts = name.split(".")
            runs.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        graph[module] = {m for m in runs if m in files and m != module and not module.startswith(m + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as [m, ..., m], or None when there is none."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [module, dep] if dep in path else [module, dep]
            if dep not in state:
                cycle = visit(dep, path + [module])
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [])
            if cycle:
                return cycle
    return None


def check_no_import_cycles(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> None:
    cycle = find_cycle(import_graph(root, packages))
    if cycle:
        raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_no_import_cycles():
    check_no_import_cycles()


def test_the_cycle_finder_sees_a_cycle_through_a_package_init(tmp_path):
    """A tree planted here: pkg_a's __init__ imports pkg_a.x, which imports pkg_b.y, whose
    function-local import of pkg_a.z runs pkg_a's __init__ first: a cycle through an __init__."""
    files = {"pkg_a/__init__.py": "from pkg_a.x import X\n",
             "pkg_a/x.py": "import pkg_b.y\nfrom pkg_a import z\nX = 1\n",
             "pkg_a/z.py": "Z = 2\n",
             "pkg_b/__init__.py": "from .y import f\n",
             "pkg_b/y.py": "def f():\n    from pkg_a.z import Z\n    return Z\n"}
    for name, code in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(code)
    graph = import_graph(tmp_path, ("pkg_a", "pkg_b"))
    assert graph == {"pkg_a": {"pkg_a.x"}, "pkg_a.x": {"pkg_b", "pkg_b.y", "pkg_a.z"}, "pkg_a.z": set(),
                     "pkg_b": {"pkg_b.y"}, "pkg_b.y": {"pkg_a", "pkg_a.z"}}
    with pytest.raises(AssertionError, match=r"import cycle: pkg_a -> pkg_a\.x -> pkg_b -> pkg_b\.y -> pkg_a$"):
        check_no_import_cycles(tmp_path, ("pkg_a", "pkg_b"))
    graph["pkg_b.y"].discard("pkg_a")  # the edge into an __init__ is what closes the cycle
    assert find_cycle(graph) is None


def test_seqmodels_never_imports_data_modules():
    """data_modules imports seqmodels' leaf modules, never the reverse, not even inside a function."""
    for module, path in module_files(ROOT, ("seqmodels",)).items():
        found = {n for n in imported_names(path, module) if n == "data_modules" or n.startswith("data_modules.")}
        assert not found, (path, found)


def test_cells_know_nothing_of_lightning_and_data_nothing_of_models():
    graph = import_graph()
    assert not {d for d in graph["seqmodels.cells"] if d.startswith(("seqmodels.tasks", "seqmodels.cli", "data_modules"))}
    source = (ROOT / "seqmodels" / "cells.py").read_text()
    assert "lightning" not in source
    # "seqmodels": the package's __init__, which any seqmodels import runs first
    leaves = {"seqmodels", "seqmodels.errors", "seqmodels.compat", "seqmodels.caches", "seqmodels.formats"}
    for module, deps in graph.items():
        if module.startswith("data_modules"):
            assert deps <= {d for d in graph if d.startswith("data_modules")} | leaves, (module, deps)


def test_only_runs_py_knows_where_run_folders_are():
    for path in (ROOT / "seqmodels").rglob("*.py"):
        if path.name != "runs.py":
            assert "def run_dir" not in path.read_text(), path


PRIVATE = ("torch._VF", "torch.ops.mkldnn", "_cudnn_rnn_flatten_weight", "_batches_that_stepped",
           "_save_last_checkpoint", "_should_skip_saving_checkpoint", "_monitor_candidates",
           "_parse_ckpt_path", "_num_yielded", "from torch import _VF", "def _apply(", "_get_build_directory")


def test_private_internals_only_in_compat():
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path.name == "compat.py":
                continue
            code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
            found = [p for p in PRIVATE if p in code and f"``{p}" not in code]
            assert not found, (path, found)


def test_an_untested_version_warns_in_one_line():
    from seqmodels import compat

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_versions({"torch": "2.13.0+cpu", "lightning": "2.6.6", "torchdata": "0.11.0"})
    with pytest.warns(UserWarning, match=r"lightning 9.0.0 is installed: if something breaks, install a tested"):
        compat.check_versions({"lightning": "9.0.0"})
    with pytest.warns(UserWarning, match="torch 2.1.0"):
        compat.check_versions({"torch": "2.1.0"})
    assert set(compat.installed_versions()) == {"torch", "lightning", "torchdata"}


@pytest.mark.slow
def test_the_cells_load_neither_lightning_nor_data():
    """In a fresh process: the cells, the stack and the hand-written backward import torch and
    the project's own leaf modules only (none of these imports loads any of them, since together
    they load none)."""
    code = ("import sys; import seqmodels.cells; from seqmodels import RecurrentStack; import seqmodels.nn; "
            "import seqmodels.backends, seqmodels.bptt; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', "
            "'lightning_fabric', 'torchdata', 'data_modules', 'wandb', 'datasets', 'torchmetrics'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
