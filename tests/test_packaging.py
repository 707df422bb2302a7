"""What pyproject.toml promises: `make test-floors` installs the lowest release of each
dependency it allows, from tests/floors.txt, so that list must follow pyproject's floors; and
the code must run on the oldest Python it allows, which this machine does not have."""

from __future__ import annotations

import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def read_project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


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
    project = read_project()
    pinned = floors((ROOT / "tests" / "floors.txt").read_text().splitlines())
    wanted = {}
    for text in project["dependencies"]:
        requirement = Requirement(text)
        if requirement.marker is not None:
            continue  # tomli, for Python 3.10 only
        wanted[requirement.name] = lowest(requirement)
        assert wanted[requirement.name] is not None, f"{text}: give it a floor (>=)"
        assert requirement.specifier.contains(wanted[requirement.name]), text
    for text in project["optional-dependencies"]["parquet"]:  # a reader's, so floored too
        requirement = Requirement(text)
        wanted[requirement.name] = lowest(requirement)
    assert pinned == wanted


def test_a_floor_list_is_read_as_pip_reads_its_pins():
    assert floors(["# a comment", "", "torch==2.8.0  # CUDA", "numpy==1.24"]) == {
        "torch": Version("2.8"),
        "numpy": Version("1.24.0"),
    }
    assert lowest(Requirement("torch>=2.8,<3")) == Version("2.8")
    assert lowest(Requirement("tqdm")) is None


def test_the_code_needs_no_newer_python_than_requires_python():
    """Only Python 3.11 runs the suite here, so vermin reads every file for a module,
    function or syntax newer than requires-python's floor (e.g. itertools.batched, 3.12).
    A use guarded at run time is marked `# novermin` on its line."""
    pytest.importorskip("vermin")
    floor = lowest(Requirement("python" + read_project()["requires-python"]))
    assert floor is not None
    target = f"-t={floor.major}.{floor.minor}-"
    main = "import sys; from vermin import main; sys.exit(main())"
    found = subprocess.run([sys.executable, "-c", main, "--no-tips", "--eval-annotations",
                            "--violations", target, "src", "tests", "bench"],
                           cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert found.returncode == 0, found.stdout + found.stderr
