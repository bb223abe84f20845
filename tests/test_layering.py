"""Layering (ARCHITECTURE.md): maws_data imports neither maws_train nor maws_eval; maws_train does not
import maws_eval. Checked on the source with `ast`, so lazy imports inside functions count too."""

import ast
from pathlib import Path

import pytest

PACKAGES = Path(__file__).resolve().parents[1] / "packages"
FORBIDDEN = {"maws_data": ("maws_train", "maws_eval"), "maws_train": ("maws_eval",), "maws_eval": ()}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import statement in a file, at any depth (absolute imports only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def test_imported_modules_sees_lazy_and_dynamic_imports(tmp_path):
    src = ("import os\nfrom maws_eval.report import x\ndef f():\n    import maws_train.models as m\n"
           "    importlib.import_module('maws_eval')\n")
    probe = tmp_path / "probe.py"
    probe.write_text(src)
    assert imported_modules(probe) == [(1, "os"), (2, "maws_eval.report"), (4, "maws_train.models"), (5, "maws_eval")]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layering(package):
    src = PACKAGES / package.split("_", 1)[1] / "src" / package
    if not src.is_dir():
        pytest.skip(f"{src} not present")
    files = sorted(src.rglob("*.py"))
    assert files, f"no Python files under {src}"
    violations = [f"{f.relative_to(PACKAGES)}:{line} imports {mod}"
                  for f in files for line, mod in imported_modules(f)
                  if mod.split(".")[0] in FORBIDDEN[package]]
    assert not violations, "layering broken (ARCHITECTURE.md):\n" + "\n".join(violations)
