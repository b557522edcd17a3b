"""launch/ scripts: valid bash, clean under shellcheck, and they refuse to start (exit 1, naming
the variable or binary) when something required is missing. DRY_RUN=1 shows the command.
sglang_fleet.sh with fake nvidia-smi and sglang: a failed start or a signal stops the servers it
started (a signal exits 128 + its number), a normal start leaves them running."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

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


# A stand-in for an interpreter with sglang: `-c ...` succeeds; `-m sglang.launch_server ... --port
# P` records its pid, then crashes when P is $FAKE_CRASH_PORT, never gets healthy when P is
# $FAKE_HANG_PORT, and otherwise serves /health.
FAKE_PYTHON = """#!/bin/bash
[[ "$1" == "-c" ]] && exit 0
while [[ $# -gt 0 ]]; do [[ "$1" == "--port" ]] && PORT=$2; shift; done
echo $$ >> "$FAKE_PIDS"
[[ "$PORT" == "$FAKE_CRASH_PORT" ]] && { echo "fake crash"; exit 1; }
[[ "$PORT" == "$FAKE_HANG_PORT" ]] && exec sleep 300
exec %s -c "
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self): self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(('127.0.0.1', $PORT), H).serve_forever()"
"""


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no two adjacent free ports")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.fixture
def fake_fleet(tmp_path):
    """(env, pids()) for sglang_fleet.sh with fake nvidia-smi (2 GPUs) and sglang; the fake
    servers still running at the end are killed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/bash\necho 'GPU 0: fake'; echo 'GPU 1: fake'\n")
    (bin_dir / "python").write_text(FAKE_PYTHON % sys.executable)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    pid_file = tmp_path / "pids"
    port = _free_port_pair()
    env = {"MODEL_PATH": "/m", "BASE_PORT": str(port), "PYTHON": str(bin_dir / "python"),
           "LOG_DIR": str(tmp_path / "logs"), "ADVERTISE_HOST": "localhost",
           "FAKE_PIDS": str(pid_file), "FAKE_CRASH_PORT": "", "FAKE_HANG_PORT": ""}

    def pids() -> list[int]:
        return [int(p) for p in pid_file.read_text().split()] if pid_file.exists() else []

    yield env, pids, f"{bin_dir}:{BARE_PATH}"
    for pid in pids():
        if _alive(pid):
            os.kill(pid, 9)


def _wait_dead(pids, timeout_s=10.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def test_fleet_start_failure_stops_the_servers_already_started(fake_fleet):
    env, pids, path = fake_fleet
    env.update(NUM_SERVERS="2", FAKE_CRASH_PORT=str(int(env["BASE_PORT"]) + 1))
    out = _run("launch/sglang_fleet.sh", env, path=path)
    assert out.returncode == 1, out.stderr
    assert "server 1 exited during start-up" in out.stderr
    assert len(pids()) == 2
    assert _wait_dead(pids()) == [], "server 0 kept running after the failed start"


def test_fleet_sigterm_during_start_up_stops_the_servers_and_exits_143(fake_fleet):
    env, pids, path = fake_fleet
    env.update(NUM_SERVERS="1", FAKE_HANG_PORT=env["BASE_PORT"])
    proc = subprocess.Popen([BASH, os.path.join(ROOT, "launch/sglang_fleet.sh")], cwd=ROOT,
                            env={"PATH": path, "HOME": "/tmp", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pids(), "the fake server never started"
    proc.terminate()
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143, stderr
    assert "exited during start-up" not in stderr and "error" not in stderr, stderr
    assert "stopping 1 server(s)" in stdout
    assert _wait_dead(pids()) == []


def test_fleet_started_servers_keep_running_after_a_normal_exit(fake_fleet):
    env, pids, path = fake_fleet
    env.update(NUM_SERVERS="2")
    out = _run("launch/sglang_fleet.sh", env, path=path)
    assert out.returncode == 0, out.stderr
    assert "FLEET_URLS=http://localhost:" in out.stdout and "stopping" not in out.stdout
    assert len(pids()) == 2 and all(_alive(p) for p in pids())
