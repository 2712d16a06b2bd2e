"""The package list in pyproject.toml matches the folders, and the wheel carries kernels and search spaces."""

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed():
    tool = _pyproject()["tool"]["setuptools"]
    listed = set(tool["packages"])
    dirs = tool["package-dir"]
    on_disk = set()
    for base, prefix in [(ROOT / "circtune", "circtune"), (ROOT / "kernels", "circtune.kernels"),
                         (ROOT / "search_spaces", "circtune.search_spaces")]:
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            on_disk.add(".".join((prefix, *rel)))
    assert listed == on_disk
    assert dirs == {"circtune.kernels": "kernels", "circtune.search_spaces": "search_spaces"}


def test_wheel_contents(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("circtune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "circtune/kernels/__init__.py" in names
    assert "circtune/search_spaces/__init__.py" in names
    assert "circtune/adapters/_circulant.py" in names
    assert not [n for n in names if n.startswith(("kernels/", "search_spaces/", "tests/"))]
