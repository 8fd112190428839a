"""The layer rule: the core imports neither the analysis, the CLI nor the test kit; nothing ships imports tests."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package folder -> the tokencomp subpackages its modules must not import
FORBIDDEN = {
    "tokencomp": ("tokencomp.analysis", "tokencomp.cli", "tokencomp.testing"),
    "strategies": ("tokencomp.analysis", "tokencomp.cli", "tokencomp.testing", "tokencomp.integrations"),
    "tokencomp/kernels": ("tokencomp.analysis", "tokencomp.cli", "tokencomp.testing", "tokencomp.integrations"),
    "tokencomp/integrations": ("tokencomp.analysis", "tokencomp.cli", "tokencomp.testing"),
    "analysis": ("tokencomp.cli", "tokencomp.testing"),
}
# modules allowed to cross (the edge that joins two layers on purpose)
EXEMPT = {"tokencomp/cli", "tokencomp/testing"}


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved against ``package``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                names.add(node.module)
    return names


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
    if parts[0] in ("strategies", "analysis"):
        parts = ["tokencomp", *parts]
    return ".".join(parts[:-1]) if rel.name != "__init__" else ".".join(parts)


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layers_import_only_downwards(folder):
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if any(rel.startswith(e + "/") for e in EXEMPT) or "/_build/" in rel:
            continue
        if folder == "tokencomp" and any(rel.startswith(f + "/") for f in FORBIDDEN if f != "tokencomp"):
            continue
        for name in _imports(path, _package_of(path)):
            if (
                name == "tests"
                or name.startswith("tests.")
                or any(name == f or name.startswith(f + ".") for f in FORBIDDEN[folder])
            ):
                bad.append(f"{rel} imports {name}")
    assert not bad, "\n".join(bad)


def test_import_tokencomp_loads_only_the_core():
    code = (
        "import sys, tokencomp as tc; tc.available(); "
        "print(' '.join(m for m in ('matplotlib', 'skimage', 'transformers', 'typer', 'rich', "
        "'tokencomp.analysis', 'tokencomp.cli', 'tokencomp.testing') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_benchmarks_do_not_load_the_test_kit():
    code = "import sys, tokencomp.analysis.bench; print('tokencomp.testing' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
