"""launch/ scripts: valid bash, clean under shellcheck, and they refuse to start (exit 1, naming
the variable or binary) when something required is missing. DRY_RUN=1 shows the command."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINE = ["launch/tpu_pod.sh", "launch/gpu_multihost.sh"]
ALL = MINE + ["launch/sglang_fleet.sh"]
# A PATH with coreutils (the scripts' required variables are checked before any binary).
BARE_PATH = "/usr/bin:/bin"
BASH = shutil.which("bash")


def _run(script, env=None, args=(), path=BARE_PATH):
    return subprocess.run([BASH, os.path.join(ROOT, script), *args], cwd=ROOT,
                          env={"PATH": path, "HOME": "/tmp", **(env or {})},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", ALL)
def test_bash_syntax(script):
    out = subprocess.run(["bash", "-n", os.path.join(ROOT, script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("script", ALL)
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    # Our scripts are clean at every level; the fleet script (another owner's) at warnings.
    level = "style" if script in MINE else "warning"
    out = subprocess.run(["shellcheck", "-S", level, os.path.join(ROOT, script)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


TPU = {"TPU_NAME": "pod", "ZONE": "us-west4-a", "WORKDIR": "/mnt/shared/run"}
GPU = {"WORKDIR": "/shared/run", "GPUS_PER_NODE": "8", "NODES": "2"}


@pytest.mark.parametrize("script, full, missing", [
    ("launch/tpu_pod.sh", TPU, "TPU_NAME"),
    ("launch/tpu_pod.sh", TPU, "ZONE"),
    ("launch/tpu_pod.sh", TPU, "WORKDIR"),
    ("launch/gpu_multihost.sh", GPU, "WORKDIR"),
    ("launch/gpu_multihost.sh", GPU, "GPUS_PER_NODE"),
    ("launch/gpu_multihost.sh", GPU, "NODES"),
    ("launch/sglang_fleet.sh", {"MODEL_PATH": "/m"}, "MODEL_PATH"),
])
def test_refuses_when_a_required_variable_is_missing(script, full, missing):
    env = {k: v for k, v in full.items() if k != missing}
    out = _run(script, {**env, "DRY_RUN": "1"})
    assert out.returncode == 1
    assert f"{missing} is not set" in out.stderr
    assert out.stdout == ""  # refused before doing or announcing anything


@pytest.mark.parametrize("script, env, binary", [
    ("launch/tpu_pod.sh", TPU, "gcloud"),
    ("launch/gpu_multihost.sh", GPU, "srun"),
])
def test_refuses_when_the_launcher_binary_is_missing(script, env, binary, tmp_path):
    out = _run(script, env, path=str(tmp_path))  # an empty PATH directory: no launcher
    assert out.returncode == 1 and f"{binary} not found" in out.stderr


def test_bad_values_are_refused_naming_them():
    out = _run("launch/gpu_multihost.sh", {**GPU, "PER": "rack", "DRY_RUN": "1"})
    assert out.returncode == 1 and "PER=rack" in out.stderr
    out = _run("launch/gpu_multihost.sh", {**GPU, "NODES": "two", "DRY_RUN": "1"})
    assert out.returncode == 1 and "NODES=two" in out.stderr


def test_tpu_pod_dry_run_shows_the_command_for_every_worker():
    out = _run("launch/tpu_pod.sh", {**TPU, "DRY_RUN": "1"}, ["--config.trainer.steps=7"])
    assert out.returncode == 0, out.stderr
    assert "--worker=all" in out.stdout and "--zone=us-west4-a" in out.stdout
    assert "-m clawjax.train" in out.stdout
    assert "--config.distributed.enabled=True --config.trainer.steps=7" in out.stdout


@pytest.mark.parametrize("per, tasks, ids", [("node", "1", "0,1,2,3,4,5,6,7"), ("gpu", "8", None)])
def test_gpu_multihost_dry_run_one_process_per_node_or_gpu(per, tasks, ids):
    out = _run("launch/gpu_multihost.sh", {**GPU, "PER": per, "DRY_RUN": "1"})
    assert out.returncode == 0, out.stderr
    assert f"srun --nodes=2 --gpus-per-node=8 --kill-on-bad-exit=1 --ntasks-per-node={tasks}" \
        in out.stdout
    assert "--config.distributed.enabled=True" in out.stdout
    assert ("--config.distributed.local_device_ids=" + ids in out.stdout) if ids else \
        "local_device_ids" not in out.stdout


def test_gpu_multihost_takes_the_node_count_from_the_allocation():
    env = {k: v for k, v in GPU.items() if k != "NODES"}
    out = _run("launch/gpu_multihost.sh", {**env, "SLURM_JOB_NUM_NODES": "3", "DRY_RUN": "1"})
    assert out.returncode == 0 and "srun --nodes=3" in out.stdout
