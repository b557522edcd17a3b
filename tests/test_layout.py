"""The project layout of the product card and the packaging contract of DESIGN.md."""

import os
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_top_level_layout():
    for name in ("clawjax", "kernels", "configs", "launch", "tests", "requirements.txt",
                 "README.md", "pyproject.toml", ".ci/run"):
        assert os.path.exists(os.path.join(ROOT, name)), name


def test_every_package_directory_is_listed_in_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {"clawjax.kernels", "clawjax.configs"}
    for dirpath, _, files in os.walk(os.path.join(ROOT, "clawjax")):
        if "__init__.py" in files and "__pycache__" not in dirpath:
            rel = os.path.relpath(dirpath, ROOT).replace(os.sep, ".")
            found.add(rel)
    assert found == listed, f"unlisted: {found - listed}, stale: {listed - found}"


def test_kernels_installs_as_clawjax_kernels_not_top_level():
    code = ("import importlib.util, clawjax.kernels; "
            "print(importlib.util.find_spec('kernels') is None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd="/", check=True)
    assert out.stdout.strip() == "True"


def test_trainer_requirements_exclude_sglang_and_torch():
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        names = {line.split(">")[0].split("=")[0].split("[")[0].strip().lower()
                 for line in f if line.strip() and not line.startswith("#")}
    assert "sglang" not in names and "torch" not in names
    for needed in ("jax", "flax", "optax", "orbax-checkpoint", "transformers", "grain",
                   "tensorflow-datasets", "ml-collections", "grpcio", "protobuf"):
        assert needed in names, needed
    with open(os.path.join(ROOT, "requirements-test.txt")) as f:
        assert "torch==2.13.0" in f.read()


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    command = 'pip install -e ".[test]" && python -m pytest -q -n 2 --dist loadfile tests'
    assert command in readme and command in ci
    assert "python -m clawjax.train" in readme
