"""The documentation: a short README, a page per capability, every public name in the reference."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["lightning_gradnoise", "lightning_gradnoise.stats", "lightning_gradnoise.scaling", "lightning_gradnoise.nqm",
            "lightning_gradnoise.capture", "lightning_gradnoise.control", "lightning_gradnoise.optim",
            "lightning_gradnoise.callbacks", "lightning_gradnoise.strategies"]


def test_readme_is_a_front_page() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text) < 12_000, f"README.md has {len(text)} characters"
    for heading in ("## Install", "## Two commands on a fresh machine", "## Usage", "## How to read the numbers"):
        assert heading in text
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).is_file(), f"README links to a missing page {link}"


def test_a_guide_per_capability_in_the_site() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in ("guide/measure.md", "guide/distributed.md", "guide/autotune.md", "guide/vr-optimizers.md",
                 "guide/plan-and-report.md", "math.md", "reading.md", "install.md"):
        assert page in nav and (ROOT / "docs" / page).is_file(), page


@pytest.mark.parametrize("package", PACKAGES)
def test_the_api_reference_lists_every_public_name(package: str) -> None:
    reference = "\n".join(p.read_text() for p in (ROOT / "docs" / "reference").glob("*.md"))
    documented = set(re.findall(r"(?:::: |\]\[)lightning_gradnoise[\w.]*\.(\w+)", reference))
    missing = [n for n in importlib.import_module(package).__all__ if not n.startswith("__") and n not in documented]
    assert not missing, f"{package}: not in docs/reference (run python scripts/api_reference.py): {missing}"
