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
`stop()` and `stop_child` cancel a start or restart in progress (`Child.cancel`), so neither
waits out a readiness timeout. A child's stdout is read through `clawjax.pipe_lines`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

from clawjax.pipe_lines import PipeLines

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


class StartCancelled(RuntimeError):
    """`Child.start` gave up because the child was cancelled (its stack is stopping, or
    `stop_child` took it away); no process of that start is left running."""


@dataclasses.dataclass
class Child:
    """One supervised process: `args` after `python -m`, a regex whose group 1 is its address;
    `env` is laid over this process's environment. Once `cancel()` is called it is never
    started again."""

    name: str
    args: list[str]
    ready: str
    log_path: str
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    proc: subprocess.Popen | None = None
    address: str = ""
    restarts: int = 0
    supervised: bool = False  # set once its first start succeeded: only then restarted
    _cancelled: threading.Event = dataclasses.field(default_factory=threading.Event,
                                                    repr=False, compare=False)
    _starting: threading.RLock = dataclasses.field(default_factory=threading.RLock,
                                                   repr=False, compare=False)  # held by start()

    def start(self, timeout_s: float = 180.0) -> str:
        """Starts the process and waits up to `timeout_s` for a stdout line that `ready`
        matches; returns its group 1 (also `address`) and drains the rest of the output in a
        thread. Raises RuntimeError (the log's tail in it) if the child exits or is not ready
        by then, `StartCancelled` if `cancel()` comes first (noticed within
        `pipe_lines.POLL_S`; a process already forked is stopped). One start at a time;
        `cancel()` waits for it to end."""
        with self._starting:
            if self._cancelled.is_set():
                raise StartCancelled(f"{self.name}: cancelled, not started")
            self.proc = self._spawn()
            lines = PipeLines(self.proc.stdout)
            match = lines.wait_for(re.compile(self.ready), time.monotonic() + timeout_s,
                                   give_up=self._start_is_over)
            if match:
                self.address = match.group(1)
                threading.Thread(target=lines.drain, name=f"{self.name}-stdout",
                                 daemon=True).start()
                return self.address
            self.stop()
            if self._cancelled.is_set():
                raise StartCancelled(f"{self.name}: cancelled while starting; stopped")
            with open(self.log_path) as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"{self.name} did not start (exit code {self.proc.returncode}); "
                               f"log {self.log_path}:\n{tail}")

    def _spawn(self) -> subprocess.Popen:
        """`python -m *args`, stdout an unbuffered binary pipe (read by `PipeLines`), stderr
        appended to the log, in a session of its own, SIGTERM when its parent thread dies."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
        with open(self.log_path, "a") as log_file:   # the child holds its own copy
            return subprocess.Popen([sys.executable, "-m", *self.args],
                                    stdout=subprocess.PIPE, stderr=log_file, bufsize=0,
                                    env=env, preexec_fn=_die_with_parent,
                                    # Own session: a terminal's Ctrl-C reaches the
                                    # trainer only, which then stops the children in order.
                                    start_new_session=True)

    def _start_is_over(self) -> bool:
        """The readiness wait's end besides its deadline: cancelled, or the process exited."""
        return self._cancelled.is_set() or self.proc.poll() is not None

    def cancel(self) -> None:
        """Ends a `start()` in progress and refuses every later one (`StartCancelled`).
        Returns once no start is in progress (within `pipe_lines.POLL_S` plus the time a
        half-started process takes to stop); a process that had already started is left
        running: `stop()` it. From the thread inside `start()` (a signal handler) it returns
        at once, and that start ends when the handler has returned."""
        self._cancelled.set()
        with self._starting:
            pass

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM, SIGKILL after `timeout_s`; returns once the process is reaped."""
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
        self._children_lock = threading.Lock()  # held while a child is added or removed
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
            if self._stop.is_set():
                raise StartCancelled(f"{name}: the stack is stopping, not started")
            self.children[name] = child   # stopped by `stop()` even while it starts
        for attempt in range(3):  # a previous run's child may still be releasing its files
            try:
                address = child.start()
                break
            except StartCancelled:
                self._forget(name, child)
                raise
            except RuntimeError:
                if attempt == 2:
                    self._forget(name, child)
                    raise
                log.warning("%s failed to start, retrying", name)
                time.sleep(3.0)
            except Exception:   # fork, exec, pipes: not left in `children` unsupervised
                self._forget(name, child)
                raise
        child.supervised = True
        self._write_pids()
        return address

    def _forget(self, name: str, child: Child) -> None:
        """Takes `child` out of `children` unless its name is another's by now."""
        with self._children_lock:
            if self.children.get(name) is child:
                del self.children[name]

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
        """Every 0.5 s until `stop()`: restarts each supervised child found dead. A restart
        (fork and readiness wait: minutes at worst) runs outside `_children_lock`, so
        `stop_child` never waits for it; `stop_child` and `stop()` end it with `Child.cancel`."""
        while not self._stop.wait(0.5):
            for name, child in list(self.children.items()):
                if self._needs_restart(name, child):
                    self._restart(child)

    def _needs_restart(self, name: str, child: Child) -> bool:
        with self._children_lock:  # not one that `stop_child` has taken away
            return (self.children.get(name) is child and child.supervised
                    and not child.alive() and not self._stop.is_set())

    def _restart(self, child: Child) -> None:
        """Starts a dead child again on its address. Never raises: the supervisor survives any
        failure (logged; tried again next round) and a cancelled start (not tried again)."""
        try:
            log.warning("%s exited (code %s): restarting on %s", child.name,
                        child.proc.returncode, child.address)
            child.start()
            child.restarts += 1
            self._write_pids()
        except StartCancelled:
            log.info("%s: restart cancelled", child.name)
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
        or `restarts()` any more); a no-op for a name not running. A restart of it in
        progress is cancelled, so this returns within a second or so plus the child's own
        shutdown (SIGTERM, SIGKILL after 20 s), never after a readiness timeout."""
        with self._children_lock:
            child = self.children.pop(name, None)
        if child is not None:
            child.cancel()
            child.stop()
            self._write_pids()

    def restarts(self) -> dict[str, int]:
        return {name: c.restarts for name, c in list(self.children.items())}

    def stop(self, supervisor_timeout_s: float = 5.0) -> None:
        """Stops the supervisor and every child, the last started first (agents, proxy,
        judge, server, buffer: upstream first, so that nothing is in flight towards a stopped
        process). Starts and restarts in progress are cancelled and none begins afterwards, so
        this takes the children's own shutdown (up to 20 s each before SIGKILL) plus a second
        or so, not a readiness timeout; the supervisor is waited for `supervisor_timeout_s`
        at most."""
        with self._children_lock:   # a child `_child` adds from now on is refused
            self._stop.set()
            children = list(self.children.values())
        for child in children:
            child.cancel()
        if self._supervisor is not None:
            self._supervisor.join(supervisor_timeout_s)
            if self._supervisor.is_alive():
                log.warning("supervisor still busy %.0f s after stop(); stopping the children "
                            "anyway", supervisor_timeout_s)
        for child in reversed(children):
            child.stop()
