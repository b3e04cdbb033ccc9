"""The repository map (docs/architecture.md) names only paths that exist, and stays short."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
PATH = re.compile(r"`((?:proto|kernels|router|workers|cluster|tests|bench|deploy|docs)/[\w./-]*)`")


def test_every_path_the_map_names_exists():
    names = PATH.findall(DOC.read_text())
    assert len(names) > 30, "the map names fewer paths than expected: did the pattern break?"
    missing = sorted({n for n in names if not (ROOT / n).exists()})
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_the_map_is_under_two_pages():
    assert len(DOC.read_text().splitlines()) <= 120


def test_the_readme_points_to_the_map():
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()
