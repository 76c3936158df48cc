"""An installed copy (`pip install .`, not only an editable one) ships the files the code reads
at runtime: the recipe configs (train/configs/*.yaml) and the DeepSpeed configs
(ds_configs/*.json), at the paths the code looks for them (beside the packages, as in the
repository: train/main.py's ROOT is the folder above train/)."""
from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
import zipfile
from subprocess import DEVNULL, CalledProcessError
from subprocess import check_output as git_files

import pytest

from tests.conftest import ROOT

setuptools_config = pytest.importorskip("setuptools.config.pyprojecttoml", reason="needs setuptools (the build backend)")

# Not read by the code (run from a checkout): left out of the package on purpose.
NOT_SHIPPED = {"launchers/local_slurm.sh"}


def _configuration() -> tuple[list[str], dict[str, list[str]]]:
    setuptools = setuptools_config.read_configuration(ROOT / "pyproject.toml")["tool"]["setuptools"]
    return setuptools["packages"], setuptools.get("package-data", {})


def _data_files() -> list[str]:
    """Every file of the shipped folders that is not Python source, as a repository path: the
    files git tracks (not, say, a dataset converted into data/), or all of them without git."""
    packages, _ = _configuration()
    tops = sorted({p.split(".")[0] for p in packages})
    try:  # `git ls-files` takes milliseconds: this does not make the test slow
        listed = git_files(["git", "ls-files", "-z", "--", *tops], cwd=ROOT, stderr=DEVNULL).decode().split("\0")
        paths = [ROOT / p for p in listed if p]
    except (OSError, CalledProcessError):
        paths = [p for top in tops for p in (ROOT / top).rglob("*")]
    files = [p.relative_to(ROOT).as_posix() for p in paths
             if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    return sorted(set(files) - NOT_SHIPPED)


def test_every_file_the_code_reads_matches_a_package_data_glob():
    packages, package_data = _configuration()
    files = _data_files()
    assert {"ds_configs/zero2.json", "train/configs/mindeye_tiny.yaml"} <= set(files)
    assert "ds_configs" in packages and "train" in packages
    for path in files:
        owners = [p for p in package_data if path.startswith(p.replace(".", "/") + "/")]
        assert any(fnmatch.fnmatch(path[len(p) + 1:], glob) for p in owners for glob in package_data[p]), \
            f"{path}: matches no [tool.setuptools.package-data] glob of pyproject.toml (or add it to NOT_SHIPPED)"


def test_the_built_wheel_holds_the_configs_where_the_code_looks_for_them(tmp_path):
    """Builds the wheel from a copy of the sources (nothing is written into the repository)."""
    src = tmp_path / "src"
    packages, _ = _configuration()
    for top in sorted({p.split(".")[0] for p in packages}):
        shutil.copytree(ROOT / top, src / top, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, timeout=1800)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    [wheel] = (tmp_path / "wheel").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [path for path in _data_files() if path not in names]
    assert not missing, f"not in {wheel.name}: {missing}"
    from train import main  # the defaults of an installed copy: ROOT is site-packages
    args = main.parse([])
    for default in (args.config, args.ds_config):
        assert default.relative_to(main.ROOT).as_posix() in names
