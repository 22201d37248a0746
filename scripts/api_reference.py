"""Write docs/reference/*.md: one page per public package, one entry per name of its __all__.

Each entry points at the module that defines the name (the packages load their names lazily,
which a static reader does not follow). Run it after adding a public name:

    python scripts/api_reference.py
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

PAGES = {
    "package": ("lightning_gradnoise", "The top-level package: the callbacks, the strategy, the tracker and the optimizer factory, each loaded when first used."),
    "stats": ("lightning_gradnoise.stats", "Layer 1: the estimators as pure functions on tensors, EMAs, GR-Gauge's theory formulas. No Lightning."),
    "scaling": ("lightning_gradnoise.scaling", "Layer 1: learning rate and steps against batch size (McCandlish, the surge rule), fits from runs, planning. No Lightning."),
    "nqm": ("lightning_gradnoise.nqm", "Layer 1: the noisy quadratic model. No Lightning."),
    "capture": ("lightning_gradnoise.capture", "Layer 2: moment capture from autograd and DDP, and the step-by-step tracker. Plain PyTorch."),
    "control": ("lightning_gradnoise.control", "Layer 3: the auto-tuning decisions as plain objects. No Lightning."),
    "optim": ("lightning_gradnoise.optim", "Layer 3: LAMB, LARS, the GSNR transformation, the VR optimizers and the factory. Torch only."),
    "callbacks": ("lightning_gradnoise.callbacks", "Layer 4: the Lightning callbacks."),
    "strategies": ("lightning_gradnoise.strategies", "Layer 4: the `gnddp` strategy."),
}
ROOT = Path(__file__).resolve().parents[1]


def defining_module(package: str, name: str) -> str:
    """The module whose source holds ``name``."""
    obj = getattr(importlib.import_module(package), name)
    if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__.startswith("lightning_gradnoise"):
        module = obj.__module__
        if hasattr(importlib.import_module(module), name):
            return module
    where = getattr(importlib.import_module(package), "_WHERE", {})
    if name in where:
        target = where[name]
        return f"{package}.{target}" if target.startswith("_") else defining_module(f"lightning_gradnoise.{target}", name)
    for module in sorted(p.stem for p in (ROOT / package.replace(".", "/")).glob("_*.py") if not p.stem.startswith("__")):
        mod = importlib.import_module(f"{package}.{module}")
        if name in getattr(mod, "__all__", ()):
            return mod.__name__
    return package


def index_page(package: str, blurb: str) -> str:
    """The top-level names, each linked to its entry on its sub-package's page."""
    rows = ["| name | what |", "|---|---|"]
    for name in importlib.import_module(package).__all__:
        if name.startswith("__"):
            continue
        obj = getattr(importlib.import_module(package), name)
        first = (inspect.getdoc(obj) or "").split("\n\n")[0].replace("\n", " ").replace("|", "\\|")
        rows.append(f"| [`{name}`][{defining_module(package, name)}.{name}] | {first} |")
    return f"# `{package}`\n\n{blurb}\n\n" + "\n".join(rows) + "\n"


def page(package: str, blurb: str) -> str:
    if package == "lightning_gradnoise":
        return index_page(package, blurb)
    names = [n for n in importlib.import_module(package).__all__ if not n.startswith("__")]
    entries = [f"::: {defining_module(package, n)}.{n}\n    options:\n      heading_level: 2\n" for n in names]
    return f"# `{package}`\n\n{blurb}\n\n" + "\n".join(entries)


def main() -> None:
    out = ROOT / "docs" / "reference"
    out.mkdir(parents=True, exist_ok=True)
    for name, (package, blurb) in PAGES.items():
        (out / f"{name}.md").write_text(page(package, blurb))


if __name__ == "__main__":
    main()
