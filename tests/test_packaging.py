"""The wheel ships what an installed dynamize needs besides code: every recipe, as package data."""
import shutil
import subprocess
import sys
import zipfile
from importlib.resources import files
from pathlib import Path

from dynamize.training.recipe import RECIPE_DIR
from dynamize.version import __version__

ROOT = Path(__file__).resolve().parent.parent


def test_recipes_are_package_data_of_the_wheel(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src)
    for package in ("dynamize", "dynamize_cli"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    build = "from setuptools import build_meta; print(build_meta.build_wheel(r'%s'))" % (tmp_path / "dist")
    done = subprocess.run([sys.executable, "-c", build], cwd=src, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = tmp_path / "dist" / done.stdout.strip().splitlines()[-1]
    assert wheel.name.startswith(f"dynamize-{__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = sorted(RECIPE_DIR.glob("*.yaml"))
    assert recipes and {f"dynamize/recipes/{p.name}" for p in recipes} <= names
    assert Path(str(files("dynamize") / "recipes")) == RECIPE_DIR  # where the package looks for them
