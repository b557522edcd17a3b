"""Packaging: `python -m build` makes an sdist and a wheel (the wheel built from the sdist, as
PyPI users get it); the wheel ships `clawjax.kernels` and `clawjax.configs` and no top-level
`kernels`/`configs`; it declares requirements.txt as its dependencies; and in a fresh virtual
environment holding only jax and numpy, `from clawjax import losses` imports and computes."""

from __future__ import annotations

import email
import json
import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("build", reason="pip install build (python -m build makes the sdist and wheel)")


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    # No isolation: the build backend (setuptools) is already installed; no index needed.
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation",
                           "--skip-dependency-check", "--outdir", str(out), ROOT],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels, sdists = list(out.glob("clawjax-*.whl")), list(out.glob("clawjax-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, os.listdir(out)
    return wheels[0], sdists[0]


def test_wheel_layout(dist):
    wheel, _ = dist
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"clawjax", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    for needed in ("clawjax/losses.py", "clawjax/kernels/__init__.py",
                   "clawjax/configs/__init__.py", "clawjax/configs/default.py",
                   "clawjax/configs/tiny_cpu.py", "clawjax/buffer/rollout.proto"):
        assert needed in names, needed


def test_wheel_declares_the_runtime_requirements(dist):
    wheel, _ = dist
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(z.read(meta_name))
    requires = {r.split(";")[0].replace(" ", "") for r in meta.get_all("Requires-Dist")
                if "extra ==" not in r}
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        wanted = {line.split("#")[0].strip().replace(" ", "") for line in f}
    assert requires == {w for w in wanted if w}


def test_sdist_holds_what_a_rebuild_needs(dist):
    _, sdist = dist
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for needed in ("pyproject.toml", "README.md", "requirements.txt", "requirements-test.txt",
                   "kernels/__init__.py", "configs/tiny_cpu.py", "clawjax/losses.py"):
        assert needed in names, needed


@pytest.mark.slow
def test_losses_import_with_only_jax_and_numpy(dist, tmp_path):
    wheel, _ = dist
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for args in (["jax", "numpy"], ["--no-deps", str(wheel)]):
        proc = subprocess.run(pip + args, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    code = (
        "import importlib.util, numpy as np\n"
        "from clawjax import losses\n"
        "assert importlib.util.find_spec('flax') is None and importlib.util.find_spec('torch') is None\n"
        "assert importlib.util.find_spec('kernels') is None\n"
        "logp = np.log(np.array([[0.5, 0.25]], np.float32)); old = np.log(np.array([[0.25, 0.25]], np.float32))\n"
        "loss, clipped = losses.ppo_policy_loss(logp, old, np.ones((1, 2), np.float32))\n"
        "import json; print(json.dumps([np.asarray(loss).tolist(), np.asarray(clipped).tolist()]))\n")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path), env={"PATH": os.environ["PATH"], "HOME": str(tmp_path),
                                                  "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # ratio 2 is clipped at 1.28 (advantage +1): max(-2, -1.28) = -1.28; ratio 1: -1.
    loss, clipped = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loss[0] == pytest.approx([-1.28, -1.0], abs=1e-6) and clipped == [[1.0, 0.0]]
