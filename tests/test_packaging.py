"""What pyproject.toml promises: `make test-floors` installs the lowest release of each
dependency it allows, from tests/floors.txt, so that list must follow pyproject's floors."""

from __future__ import annotations

import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def floors(lines: list[str]) -> dict[str, Version]:
    pins = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip()] = Version(version)
    return pins


def lowest(requirement: Requirement) -> Version | None:
    bounds = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==")]
    return min(bounds, default=None)


def test_the_floor_environment_pins_the_lowest_release_of_each_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = floors((ROOT / "tests" / "floors.txt").read_text().splitlines())
    wanted = {}
    for text in project["dependencies"]:
        requirement = Requirement(text)
        if requirement.marker is not None:
            continue  # tomli, for Python 3.10 only
        wanted[requirement.name] = lowest(requirement)
        assert wanted[requirement.name] is not None, f"{text}: give it a floor (>=)"
        assert requirement.specifier.contains(wanted[requirement.name]), text
    assert pinned == wanted


def test_a_floor_list_is_read_as_pip_reads_its_pins():
    assert floors(["# a comment", "", "torch==2.8.0  # CUDA", "numpy==1.24"]) == {
        "torch": Version("2.8"),
        "numpy": Version("1.24.0"),
    }
    assert lowest(Requirement("torch>=2.8,<3")) == Version("2.8")
    assert lowest(Requirement("tqdm")) is None
