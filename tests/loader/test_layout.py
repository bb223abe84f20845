"""The loader package's modules import each other one way only (maws_data/loader/__init__.py lists the
order): a module may import only modules listed before it. Lazy imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import maws_data.loader

ORDER = ["config", "plan", "index", "samples", "reader", "buffers", "cpu", "dali", "shard_loader"]
PACKAGE = Path(maws_data.loader.__file__).parent


def loader_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("maws_data.loader."):
            found.add(node.module.split(".")[2])
        elif isinstance(node, ast.ImportFrom) and node.module == "maws_data.loader":
            found |= {a.name for a in node.names if a.name in ORDER} or {"__init__"}
    return found


def test_loader_modules_import_one_way():
    assert sorted(p.stem for p in PACKAGE.glob("*.py")) == sorted([*ORDER, "__init__"])
    for i, name in enumerate(ORDER):
        later = loader_imports(PACKAGE / f"{name}.py") - set(ORDER[:i])
        assert not later, f"maws_data/loader/{name}.py imports {sorted(later)}, which come after it"
    assert not any(p.name in ("loader.py", "dali.py") for p in PACKAGE.parent.glob("*.py"))
