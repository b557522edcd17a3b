"""`ServerProcess`: the buffer CLI in a subprocess, for tests and benchmarks that need the real
server out of process (SIGKILL crash tests, restarts on the same directory and port)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from clawjax.pipe_lines import PipeLines

_READY = re.compile(r"clawjax buffer listening on (\S+)")


class ServerProcess:
    """`python -m clawjax.buffer serve --dir DIR --port PORT ARGS...`. `start()` returns the
    address printed by the server once it serves. `kill()` is SIGKILL (no cleanup at all);
    `restart()` starts again on the same directory and the same port."""

    def __init__(self, directory: str, *args: str, port: int = 0, ready_timeout_s: float = 60.0):
        self.directory, self.args, self.port = str(directory), list(args), port
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self._log = tempfile.NamedTemporaryFile("w+", prefix="buffer-server-", suffix=".log",
                                                delete=False)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "clawjax.buffer", "serve", "--dir", self.directory,
                "--port", str(self.port), *self.args]

    def log_tail(self, n: int = 4000) -> str:
        with open(self._log.name) as f:
            return f.read()[-n:]

    def start(self) -> str:
        """Starts the server and waits up to `ready_timeout_s` for its ready line (read by
        `PipeLines`: a partial line or two lines in one write cannot hold the wait past its
        deadline); returns its address. Raises RuntimeError (the log's tail in it) if the
        server exits or is not ready by then."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=self._log,
                                     bufsize=0, env=env)
        match = PipeLines(self.proc.stdout).wait_for(
            _READY, time.monotonic() + self.ready_timeout_s,
            give_up=lambda: self.proc.poll() is not None)
        if match:
            self.address = match.group(1)
            self.port = int(self.address.rsplit(":", 1)[1])
            return self.address
        rc = self.proc.poll()
        self.stop()
        raise RuntimeError(f"buffer server did not start (exit code {rc}): {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (clean shutdown), SIGKILL after `timeout_s`."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def restart(self) -> str:
        self.stop()
        return self.start()

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self._log.close()
        os.unlink(self._log.name)
