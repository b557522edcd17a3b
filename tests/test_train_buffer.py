"""The trainer against the live gRPC buffer (both in subprocesses): killed between checkpoints
and resumed, every pushed sample is trained exactly once and acknowledged exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from clawjax.buffer import BufferClient
from clawjax.buffer.testing import ServerProcess
from sample_factory import make_samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trainer(workdir, address, *extra):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "clawjax.train", "--config=configs/tiny_cpu.py",
           f"--config.buffer.address={address}", f"--config.workdir={workdir}",
           "--config.trainer.steps=6", "--config.trainer.samples_per_step=4",
           "--config.checkpoint.every_steps=2", "--config.trainer.take_timeout_s=2",
           "--config.buffer.keepalive_s=0.5", "--config.trainer.progress=False", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def trained_steps(workdir) -> list[dict]:
    path = os.path.join(workdir, "trained.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_killed_trainer_resumes_and_trains_every_sample_exactly_once(tmp_path):
    samples = make_samples(24, seed=21)
    with ServerProcess(str(tmp_path / "buffer"), "--lease-timeout-s", "3") as server:
        address = server.address
        client = BufferClient(address)
        client.push(samples[:12])  # three steps' worth: the trainer then waits at step 4
        workdir = str(tmp_path / "run")
        proc = trainer(workdir, address)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if any(r["step"] == 3 for r in trained_steps(workdir)) and \
                    client.stats()["acked_total"] >= 8:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)  # step 3 is trained but not checkpointed
        proc.wait()
        assert client.stats()["acked_total"] == 8  # checkpoint 2 committed and acknowledged

        client.push(samples[12:])
        resumed = trainer(workdir, address, "--config.trainer.resume=True")
        _, err = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, err[-3000:]

        lineage = trained_steps(workdir)
        assert [r["step"] for r in lineage] == [1, 2, 3, 4, 5, 6]
        trained = [i for r in lineage for i in r["sample_ids"]]
        assert sorted(trained) == sorted(s.sample_id for s in samples)  # each exactly once
        stats = client.stats()
        assert stats["acked_total"] == 24 and stats["queued"] == 0 and stats["leased"] == 0
        client.close()
