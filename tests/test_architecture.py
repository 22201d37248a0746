"""The layering rules: math and optimizers never import Lightning; capture is plain PyTorch."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lightning_gradnoise"
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")
# folder -> the package folders it may import from
ALLOWED = {
    "stats": {"stats"},
    "nqm": {"stats", "nqm"},
    "scaling": {"stats", "scaling"},
    "control": {"stats", "scaling", "control"},
    "capture": {"stats", "capture"},
    "optim": {"stats", "optim"},
}
NO_LIGHTNING = [name for name in ALLOWED if (PKG / name / "__init__.py").is_file()]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


@pytest.mark.parametrize("layer", NO_LIGHTNING)
def test_layer_imports_only_layers_below(layer: str) -> None:
    files = sorted((PKG / layer).rglob("*.py"))
    assert files
    for f in files:
        for mod in _imports(f):
            top = mod.split(".")[0]
            assert top not in LIGHTNING, f"{f.name} imports {mod}"
            if top == "lightning_gradnoise":
                sub = mod.split(".")[1] if "." in mod else ""
                assert sub in ALLOWED[layer], f"{f.relative_to(PKG)} imports {mod}, outside {ALLOWED[layer]}"


@pytest.mark.parametrize("layer", NO_LIGHTNING)
def test_layer_runs_with_lightning_unimportable(layer: str) -> None:
    # Load the layer's sub-package without the top-level __init__ (which registers Lightning
    # strategies) while any import of Lightning raises.
    code = textwrap.dedent(
        f"""
        import importlib, importlib.abc, sys, types
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in {LIGHTNING!r}:
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        pkg = types.ModuleType('lightning_gradnoise'); pkg.__path__ = [{str(PKG)!r}]
        sys.modules['lightning_gradnoise'] = pkg
        mod = importlib.import_module('lightning_gradnoise.{layer}')
        assert mod.__all__, 'empty __all__'
        for name in mod.__all__:
            getattr(mod, name)
        bad = [m for m in sys.modules if m.split('.')[0] in {LIGHTNING!r}]
        assert not bad, bad
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_public_module_declares_all() -> None:
    for f in PKG.rglob("*.py"):
        if f.name == "__main__.py":
            continue
        tree = ast.parse(f.read_text())
        names = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        assert "__all__" in names, f"{f.relative_to(PKG)} has no __all__"
