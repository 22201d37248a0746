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
# layer 0: pure-Python helpers every layer may use (argument checks, lazily loaded names)
BASE = {"_validate", "_lazy"}
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
                assert sub in ALLOWED[layer] | BASE, f"{f.relative_to(PKG)} imports {mod}, outside {ALLOWED[layer]}"


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


def test_base_helpers_import_nothing_of_the_package_but_each_other() -> None:
    for name in BASE:
        for mod in _imports(PKG / f"{name}.py"):
            assert mod.split(".")[0] not in ("torch", *LIGHTNING), f"{name} imports {mod}"
            if mod.startswith("lightning_gradnoise"):
                assert mod.split(".")[1] in BASE, f"{name} imports {mod}"


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, capture_output=True, text=True).stdout


@pytest.mark.parametrize("module", ["lightning_gradnoise", "lightning_gradnoise.stats", "lightning_gradnoise.scaling",
                                    "lightning_gradnoise.nqm", "lightning_gradnoise.cli"])
def test_math_layers_and_the_command_line_do_not_load_lightning(module: str) -> None:
    # the real package, as a user imports it; every public name of the math layers is touched
    out = _fresh(f"""
        import importlib, sys
        mod = importlib.import_module({module!r})
        if {module!r} != "lightning_gradnoise":
            for name in getattr(mod, "__all__", ()):
                getattr(mod, name)
        print(sorted(m for m in sys.modules if m.split('.')[0] in {LIGHTNING!r}))
    """)
    assert out.strip() == "[]"


def test_gradnoise_plan_loads_neither_lightning_nor_torch() -> None:
    out = _fresh("""
        import contextlib, io, sys
        from lightning_gradnoise.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["plan", "--b-simple", "300"]) == 0
        print(sorted(m for m in sys.modules if m.split('.')[0] in ("torch", "lightning", "pytorch_lightning")))
    """)
    assert out.strip() == "[]"


ORDERS = {
    "package first, lightning.pytorch": ("import lightning_gradnoise", "import lightning.pytorch as L"),
    "lightning.pytorch first": ("import lightning.pytorch as L", "import lightning_gradnoise"),
    "package first, pytorch_lightning": ("import lightning_gradnoise", "import pytorch_lightning as L"),
    "pytorch_lightning first": ("import pytorch_lightning as L", "import lightning_gradnoise"),
    "a callback used, then lightning.pytorch": ("import lightning_gradnoise as gn; gn.GradNoiseMonitor", "import lightning.pytorch as L"),
    "the strategy class used, then pytorch_lightning": ("from lightning_gradnoise import GradNoiseDDPStrategy", "import pytorch_lightning as L"),
    "top-level lightning first": ("import lightning", "import lightning_gradnoise; import lightning.pytorch as L"),
}


@pytest.fixture(scope="module")
def resolved_strategies() -> dict[str, subprocess.CompletedProcess]:
    """Each import order in a fresh interpreter, all started at once (their imports overlap)."""
    procs = {}
    for order, (first, second) in ORDERS.items():
        code = textwrap.dedent(f"""
            {first}
            {second}
            from lightning_gradnoise.strategies import STRATEGY_NAMES
            trainer = L.Trainer(accelerator="cpu", devices=1, strategy="gnddp", logger=False, enable_progress_bar=False)
            print(type(trainer.strategy).__name__, all(name in L.strategies.StrategyRegistry for name in STRATEGY_NAMES))
        """)
        procs[order] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = {}
    for order, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        done[order] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


@pytest.mark.parametrize("order", list(ORDERS), ids=list(ORDERS))
def test_gnddp_resolves_in_either_namespace_whichever_is_imported_first(order: str, resolved_strategies) -> None:
    run = resolved_strategies[order]
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-2:] == ["GradNoiseDDPStrategy", "True"]
