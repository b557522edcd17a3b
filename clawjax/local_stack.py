"""The serving and rollout loops on one machine, each its own process, supervised.

`LocalStack` starts, in order: the gRPC rollout buffer (`python -m clawjax.buffer serve`), the
embedded policy server (`python -m clawjax.serve`), the rule judge
(`python -m clawjax.rollout.rule_judge`) and the rollout proxy (`python -m clawjax.rollout
serve`). A supervisor thread restarts any child that dies, on the same port (the buffer on the
same directory, so nothing acknowledged is lost), and counts the restarts. Children get SIGTERM
when this process dies (Linux `PR_SET_PDEATHSIG`), so a killed trainer leaves no orphans.
(`os.fork()` + exec with a `preexec_fn` is safe here even though JAX is multithreaded: libc's
prctl is looked up once, in this process, so the child only calls it and then execs.) The
supervisor survives any failure to restart a child: it logs the error and tries again.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

log = logging.getLogger("clawjax.local_stack")
warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)

_PR_SET_PDEATHSIG = 1


# Environment variables through which a user sizes JAX's GPU memory pool themselves.
USER_MEMORY_SETTINGS = ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_CLIENT_MEM_FRACTION",
                        "XLA_PYTHON_CLIENT_MEM_FRACTION")


def share_accelerator(environ=os.environ) -> None:
    """Lets the local stack's JAX processes (this trainer and the policy server) share one GPU.
    By default JAX takes 75% of a GPU's memory when a process first uses it, so a second
    process on the same card would not get its own (JAX's GPU memory guide names concurrent
    processes as a usual cause of OOM). Unless the user has sized the pool (any of
    `USER_MEMORY_SETTINGS` set), asks for on-demand allocation. Call it before this process's
    first JAX computation; children started afterwards inherit it. No effect on CPU or TPU."""
    if not set(USER_MEMORY_SETTINGS) & set(environ):
        environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _libc_prctl():
    """libc's prctl, or None where there is none (not Linux)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:
        return None


_PRCTL = _libc_prctl()


def _die_with_parent() -> None:
    """Runs in the forked child before exec: SIGTERM when the thread that started it dies. Only
    calls the prctl bound at import (no library loading between fork and exec)."""
    if _PRCTL is not None:   # else children are stopped by `stop()` only
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclasses.dataclass
class Child:
    """One supervised process: `args` after `python -m`, a regex whose group 1 is its address;
    `env` is laid over this process's environment."""

    name: str
    args: list[str]
    ready: str
    log_path: str
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    proc: subprocess.Popen | None = None
    address: str = ""
    restarts: int = 0
    supervised: bool = False  # set once its first start succeeded: only then restarted

    def start(self, timeout_s: float = 180.0) -> str:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
        with open(self.log_path, "a") as log_file:   # the child holds its own copy
            self.proc = subprocess.Popen([sys.executable, "-m", *self.args],
                                         stdout=subprocess.PIPE, stderr=log_file, text=True,
                                         env=env, preexec_fn=_die_with_parent,
                                         # Own session: a terminal's Ctrl-C reaches the
                                         # trainer only, which then stops the children in order.
                                         start_new_session=True)
        pattern = re.compile(self.ready)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if select.select([self.proc.stdout], [], [], 0.2)[0]:
                line = self.proc.stdout.readline()
                match = pattern.search(line)
                if match:
                    self.address = match.group(1)
                    threading.Thread(target=self._drain, daemon=True).start()
                    return self.address
            if self.proc.poll() is not None:
                break
        self.stop()
        with open(self.log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{self.name} did not start (exit code {self.proc.returncode}); "
                           f"log {self.log_path}:\n{tail}")

    def _drain(self) -> None:
        proc = self.proc
        for _ in proc.stdout:
            pass

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class LocalStack:
    """Buffer, policy server, rule judge and proxy as supervised child processes.

    `server_platforms`: the policy server's JAX_PLATFORMS ("" = inherited), so that serving
    and training can run on separate devices. Attributes once started: `buffer_address`
    (host:port), `policy_url`, `judge_url`, `proxy_url` (http://host:port).
    """

    def __init__(self, workdir: str, model_dir: str, method: str = "combine",
                 prm_m: int | None = None, max_batch: int = 16, lease_timeout_s: float = 30.0,
                 server_platforms: str = "", teacher_topk: int = 0):
        self.workdir = workdir
        self.logs = os.path.join(workdir, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.model_dir, self.method, self.prm_m = model_dir, method, prm_m
        self.max_batch, self.lease_timeout_s = max_batch, lease_timeout_s
        self.server_platforms, self.teacher_topk = server_platforms, teacher_topk
        self.children: dict[str, Child] = {}
        self._children_lock = threading.Lock()  # held while a child is added, removed, restarted
        self._pids_lock = threading.Lock()      # one writer of pids.json (and its .tmp) at a time
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None

    def _child(self, name: str, args: list[str], ready: str,
               env: dict[str, str] | None = None) -> str:
        """Starts a child and hands it to the supervisor once it is up: until then (its process
        being forked, or not yet ready, or retried here) the supervisor leaves it alone, so it
        is never started twice at once. A child that fails three times is forgotten."""
        child = Child(name, args, ready, os.path.join(self.logs, f"{name}.log"), env or {})
        with self._children_lock:
            self.children[name] = child   # stopped by `stop()` even while it starts
        for attempt in range(3):  # a previous run's child may still be releasing its files
            try:
                address = child.start()
                break
            except RuntimeError:
                if attempt == 2:
                    with self._children_lock:
                        self.children.pop(name, None)
                    raise
                log.warning("%s failed to start, retrying", name)
                time.sleep(3.0)
        child.supervised = True
        self._write_pids()
        return address

    def _write_pids(self) -> None:
        """`workdir/pids.json`: the current process id of every child (for operators, tests)."""
        with self._pids_lock:
            pids = {name: c.proc.pid for name, c in list(self.children.items())
                    if c.proc is not None}
            tmp = os.path.join(self.workdir, "pids.json.tmp")
            with open(tmp, "w") as f:
                json.dump(pids, f)
            os.replace(tmp, os.path.join(self.workdir, "pids.json"))

    def start(self) -> "LocalStack":
        ready_url = r"READY (http://\S+)"
        self.buffer_address = self._child("buffer", [
            "clawjax.buffer", "serve", "--port", str(free_port()),
            "--dir", os.path.join(self.workdir, "buffer"),
            "--lease-timeout-s", str(self.lease_timeout_s)],
            r"clawjax buffer listening on (\S+)")
        self.policy_url = self._child("server", [
            "clawjax.serve", "--model", self.model_dir, "--port", str(free_port()),
            "--max-batch", str(self.max_batch)], ready_url,
            {"JAX_PLATFORMS": self.server_platforms} if self.server_platforms else None)
        self.judge_url = self._child("judge", [
            "clawjax.rollout.rule_judge", "--port", str(free_port())], ready_url)
        self.proxy_url = self._child("proxy", [
            "clawjax.rollout", "serve", "--port", str(free_port()), "--model-dir",
            self.model_dir, "--policy-url", self.policy_url, "--judge-url", self.judge_url,
            "--buffer", self.buffer_address, "--method", self.method,
            *(("--prm-m", str(self.prm_m)) if self.prm_m is not None else ()),
            *(("--teacher-topk", str(self.teacher_topk)) if self.teacher_topk else ()),
            "--session-expiry-s", "120"], ready_url)
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor",
                                            daemon=True)
        self._supervisor.start()
        return self

    def _supervise(self) -> None:
        while not self._stop.wait(0.5):
            for name, child in list(self.children.items()):
                with self._children_lock:  # not one that `stop_child` is taking away
                    if self.children.get(name) is not child or not child.supervised \
                            or child.alive() or self._stop.is_set():
                        continue
                    try:
                        log.warning("%s exited (code %s): restarting on %s", child.name,
                                    child.proc.returncode, child.address)
                        child.start()
                        child.restarts += 1
                        self._write_pids()
                    except RuntimeError as e:   # it did not come up: its log's tail says why
                        log.error("%s", e)
                    except Exception:   # fork, exec, pipes: tried again next round, never fatal
                        log.exception("restarting %s failed; trying again", child.name)

    def start_child(self, name: str, args: list[str], ready: str) -> str:
        """Starts one more supervised child after `start()` (`python -m *args`, its log in
        `logs/NAME.log`, `ready`: a regex whose group 1 is what it reports once serving);
        returns that group. The default run starts its simulated agents this way."""
        if name in self.children:
            raise ValueError(f"child name {name!r}: already running, expected a new name")
        return self._child(name, args, ready)

    def stop_child(self, name: str) -> None:
        """Stops a child and takes it out of supervision (not restarted, not in `pids.json`
        or `restarts()` any more); a no-op for a name not running."""
        with self._children_lock:
            child = self.children.pop(name, None)
        if child is not None:
            child.stop()
            self._write_pids()

    def restarts(self) -> dict[str, int]:
        return {name: c.restarts for name, c in list(self.children.items())}

    def stop(self) -> None:
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join()
        # The last started first: agents, proxy, judge, server, buffer (upstream first, so
        # that nothing is in flight towards a stopped process).
        for name in reversed(list(self.children)):
            self.children[name].stop()
