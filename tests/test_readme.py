"""The README tells users who do not clone how to install each part, as pyproject says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _section(title: str) -> str:
    readme = (ROOT / "README.md").read_text()
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", readme, re.M | re.S)
    assert found, f"README.md has no section '## {title}'"
    return found.group(1)


@pytest.mark.parametrize("extra", ["trainer", "export", "operator"])
def test_the_install_section_names_each_extra_and_exactly_what_it_brings(extra: str) -> None:
    section = _section("Installing without cloning")
    # the export extra goes with the trainer's: `instseg[trainer,export]`
    assert re.search(rf"pip install 'instseg\[([a-z]+,)*{extra}(,[a-z]+)*\]'", section)
    (row,) = [line for line in section.splitlines() if line.startswith(f"| `{extra}` |")]
    listed = set(re.findall(r"`([A-Za-z0-9_.-]+(?:[=<>!~]=?[^`]*)?)`", row.split("|")[3]))
    assert listed == set(PROJECT["optional-dependencies"][extra])


def test_the_install_section_says_what_the_package_alone_brings() -> None:
    section = _section("Installing without cloning")
    for requirement in PROJECT["dependencies"]:
        assert f"`{requirement}`" in section
