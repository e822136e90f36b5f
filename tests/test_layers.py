"""The package's layers: no import cycles among seqmodels/ and data_modules/, cells that know
nothing of Lightning, data that knows nothing of models, run folders owned by one module."""
from __future__ import annotations

import ast

from tests.conftest import ROOT

PACKAGES = ("seqmodels", "data_modules")


def imports() -> dict[str, set[str]]:
    """module -> the project modules it imports (at any depth of its code)."""
    files = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                submodules = {f"{node.module}.{a.name}" for a in node.names} & set(files)
                found |= submodules or {node.module}  # `from pkg import module` needs the module
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        graph[name] = {i for i in found if i in files and i != name}
    return graph


def test_no_import_cycles():
    graph = imports()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [module, dep])
                                     if dep in path else f"import cycle through {module} -> {dep}")
            if dep not in state:
                visit(dep, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_cells_know_nothing_of_lightning_and_data_nothing_of_models():
    graph = imports()
    assert not {d for d in graph["seqmodels.cells"] if d.startswith(("seqmodels.tasks", "seqmodels.cli", "data_modules"))}
    source = (ROOT / "seqmodels" / "cells.py").read_text()
    assert "lightning" not in source
    for module, deps in graph.items():
        if module.startswith("data_modules"):
            assert deps <= {d for d in graph if d.startswith("data_modules")} | {"seqmodels.errors", "seqmodels.compat",
                                                                                   "seqmodels.caches"}, (
                module, deps)


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


def test_an_untested_version_fails_loudly(monkeypatch):
    import pytest

    from seqmodels import compat

    compat.check_versions({"torch": "2.13.0+cpu", "lightning": "2.6.6", "torchdata": "0.11.0"})
    with pytest.raises(RuntimeError, match=r"lightning 9.0.0 is installed: install a tested version"):
        compat.check_versions({"lightning": "9.0.0"})
    monkeypatch.setenv("SEQMODELS_ALLOW_UNTESTED", "1")
    with pytest.warns(UserWarning, match="torch 2.1.0"):
        compat.check_versions({"torch": "2.1.0"})
