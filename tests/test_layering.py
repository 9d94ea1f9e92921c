"""Dependencies run one way: workload -> load generator -> records -> analyzers -> report.

Scans every import statement (top level and inside functions) with `ast`, so
a lazy `from servescope.harness... import` inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OLD_TOP_LEVEL = ("harness", "workloads", "reference_engine", "kernels", "analyzers", "report_templates")

# package folder -> the servescope subpackages it must never import
FORBIDDEN = {
    "analyzers": ("servescope.harness", "servescope.reference_engine", "servescope.kernels"),
    "report_templates": ("servescope.harness", "servescope.analyzers", "servescope.reference_engine", "servescope.kernels"),
    "servescope/rundir": ("servescope.harness", "servescope.analyzers", "servescope.workloads",
                          "servescope.reference_engine", "servescope.kernels", "servescope.report_templates"),
    "workloads": ("servescope.harness", "servescope.analyzers", "servescope.reference_engine", "servescope.kernels"),
    "harness": ("servescope.reference_engine", "servescope.kernels"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def python_files(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_arrow_against_the_data_flow(folder: str) -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in python_files(folder)
        for line, module in imported_modules(path)
        if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN[folder])
    ]
    assert not wrong, "imports against the data flow:\n" + "\n".join(wrong)


def test_the_scan_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from servescope.harness.api import execute_run\n")
    assert (2, "servescope.harness.api") in imported_modules(source)


def test_every_import_goes_through_servescope() -> None:
    """No bare `import harness` / `from kernels import ...`, and no relative imports, anywhere in the tree."""
    folders = [*OLD_TOP_LEVEL, "servescope", "tests", "benchmarks"]
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for folder in folders
        for path in python_files(folder)
        for line, module in imported_modules(path)
        if module.startswith(".") or module.split(".")[0] in OLD_TOP_LEVEL
    ]
    assert not wrong, "imports outside the servescope namespace:\n" + "\n".join(wrong)
