"""A terminal environment: one command per reply, run in a fresh temporary directory.

Safety, in layers (each is enough for the allow-listed commands; together they hold for more):
  - an allow-list of commands (ALLOWED_COMMANDS), resolved once to absolute paths; no shell, so
    no expansion, globbing, pipes or `;`. The one shell feature kept is a final `> file` or
    `>> file` redirect, done in Python.
  - every argument (and the redirect target) is checked: absolute paths, `~` and `..` path
    components are rejected, so nothing names a path outside the episode's directory; after each
    command any symlink that resolves outside the directory is removed.
  - each command runs with cwd = the episode directory, a minimal environment (PATH, HOME = the
    directory, LC_ALL=C), stdin closed, a wall-clock time limit (the process group is killed),
    a per-file size limit (`prlimit --fsize`) and, where the kernel allows it, in a fresh
    network namespace (`unshare -n`: no interfaces but a down loopback, so no network at all).
  - output is truncated to `max_output_chars`.

Reply syntax (the first message states it): a line `$ <command>`, or a fenced code block whose
first line is the command, or a one-line reply; a line `DONE` (without a command) ends the
episode.
Observations: the command's output as a "tool" message starting "OK" (exit 0) or "ERROR"
(non-zero exit, time-out, rejected command). On DONE, or once max_steps replies have passed,
the task's check decides the outcome: PERFECT (+1, outcome 1.0) or a correction (-1, 0.0).

Task fields: {"env": "terminal", "task_id": str, "instruction": str,
  "check": {"path": relpath} + one of {"content": str} (exact, a trailing newline ignored),
  {"contains": str} or {"exists": bool}, optional "files": {relpath: content} written first,
  optional "max_steps" (default 8)}.
"""

from __future__ import annotations

import functools
import os
import random
import re
import shlex
import shutil
import subprocess
import tempfile
import weakref
from typing import Any, Mapping

from clawjax.rollout.envs.base import (EnvError, Environment, EpisodeState, Observation,
                                       check_task, task_int, task_str)

ALLOWED_COMMANDS = ("cat", "cp", "cut", "echo", "grep", "head", "ls", "mkdir", "mv", "printf",
                    "pwd", "rm", "rmdir", "seq", "sort", "tail", "touch", "tr", "uniq", "wc")
SYSTEM_PATH = "/usr/bin:/bin"
SHELL_OPERATORS = ("|", "||", "&", "&&", ";", "<", "<<", "2>", "2>>", "&>", "$(", "`")

PERFECT = "Perfect, the task is done. Thanks!"
NOT_DONE = "That's not right: {reason}. Please check the result before you reply DONE."
INSTRUCTIONS = ("Run one command per reply, like: $ ls . Commands: {commands}. "
                "Reply DONE when the task is finished.")

_ABSOLUTE_OPTION = re.compile(r"^-[A-Za-z]+[/~]")
# `..` as a path component: at the start, after `/` or `=`, or glued to short options (`-t..`).
_PARENT = re.compile(r"(^|[/=]|^-[A-Za-z]+)\.\.([/=]|$)")


@functools.cache
def network_isolation() -> tuple[str, ...]:
    """The argv prefix that runs a command without network, or () where the kernel refuses
    (then the allow-list is what keeps commands off the network: none of them opens sockets)."""
    unshare = shutil.which("unshare", path=SYSTEM_PATH)
    if unshare is None:
        return ()
    for flags in ("-n", "-rn"):
        try:
            done = subprocess.run([unshare, flags, "--", "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return (unshare, flags, "--")
    return ()


@functools.cache
def _file_size_limit_prefix(max_file_bytes: int) -> tuple[str, ...]:
    prlimit = shutil.which("prlimit", path=SYSTEM_PATH)
    return (prlimit, f"--fsize={max_file_bytes}", "--") if prlimit else ()


def escapes_directory(token: str) -> bool:
    """Whether an argument could name a path outside the working directory: absolute paths,
    `~`, `..` components, also after `=` (`--target=/x`) or glued to a short option (`-t/x`,
    `-t..`)."""
    pieces = [token] + token.split("=")[1:]
    return (any(p.startswith(("/", "~")) for p in pieces)
            or _ABSOLUTE_OPTION.match(token) is not None or _PARENT.search(token) is not None)


def extract_command(reply: str) -> str | None:
    """The command of a reply: the first `$ ...` line, else the first line of a fenced block,
    else the reply itself when it is one line; None when there is none."""
    lines = reply.splitlines()
    for line in lines:
        if line.strip().startswith("$"):
            return line.strip()[1:].strip()
    fence = re.search(r"```[^\n]*\n(.*?)```", reply, re.DOTALL)
    if fence:
        body = [ln.strip() for ln in fence.group(1).splitlines() if ln.strip()]
        return body[0] if body else None
    stripped = [ln.strip() for ln in lines if ln.strip()]
    return stripped[0] if len(stripped) == 1 else None


def is_done(line: str | None) -> bool:
    """Whether a line says the agent is finished: "DONE", any case, trailing "." or "!" allowed."""
    return line is not None and line.strip().rstrip(".!").strip().upper() == "DONE"


def truncate(text: str, max_chars: int, total_bytes: int | None = None) -> str:
    """The first `max_chars` characters, with a note of how much output there was in all."""
    total = len(text.encode()) if total_bytes is None else total_bytes
    if len(text) <= max_chars and total <= len(text.encode()):
        return text
    return text[:max_chars] + f"\n... [output truncated: {total} bytes in all]"


class TerminalEnv(Environment):
    """See the module docstring. `allowed_commands` replaces the default allow-list (tests add
    commands to probe the sandbox); every name must resolve on /usr/bin:/bin."""

    name = "terminal"
    outcome_rewards = True

    def __init__(self, *, time_limit_s: float = 5.0, max_output_chars: int = 2000,
                 max_file_bytes: int = 1 << 20, allowed_commands: tuple[str, ...] = ALLOWED_COMMANDS,
                 root: str | None = None):
        if not time_limit_s > 0:
            raise EnvError(self.name, "time_limit_s", time_limit_s, "a positive number of seconds")
        self.time_limit_s = float(time_limit_s)
        self.max_output_chars = int(max_output_chars)
        self.max_file_bytes = int(max_file_bytes)
        self.commands: dict[str, str] = {}
        for command in allowed_commands:
            path = shutil.which(command, path=SYSTEM_PATH)
            if path is None:
                raise EnvError(self.name, "allowed_commands", command, f"a program on {SYSTEM_PATH}")
            self.commands[command] = path
        self.root = root
        self.workdir: str | None = None
        self.check: dict[str, Any] = {}
        self.max_steps = 8
        self._state = EpisodeState(self.name)

    # -- episode ------------------------------------------------------------------------------

    def reset(self, task: Mapping[str, Any]) -> Observation:
        task = check_task(self.name, task)
        instruction = task_str(self.name, task, "instruction")
        self.check = _parse_check(task.get("check"))
        files = task.get("files", {})
        if not isinstance(files, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise EnvError(self.name, "task['files']", files, "a dict of relative path → content")
        for path in files:
            _check_relative_file("task['files'] path", path)
        self.max_steps = task_int(self.name, task, "max_steps", 8, lo=1, hi=100)
        self.close()
        self.workdir = os.path.realpath(tempfile.mkdtemp(prefix="clawjax-terminal-", dir=self.root))
        # Removed on close(), or when the environment is garbage-collected without one.
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.workdir, True)
        for path, content in files.items():
            full = os.path.join(self.workdir, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w") as f:
                f.write(content)
        self._state.start()
        hint = INSTRUCTIONS.format(commands=", ".join(sorted(self.commands)))
        return Observation("user", f"{instruction} {hint}")

    def step(self, action: str) -> tuple[Observation, bool, float]:
        self._state.begin_step(action)
        command = extract_command(action)
        if is_done(command) or (command is None and any(is_done(ln) for ln in action.splitlines())):
            return self._finish(None)
        if command is None:
            observation = Observation("tool", "ERROR no command found; reply with one line: $ <command>, or DONE")
        else:
            observation = Observation("tool", self.run(command))
        if self._state.steps >= self.max_steps:
            return self._finish(observation)
        return observation, False, 0.0

    def _finish(self, last: Observation | None) -> tuple[Observation, bool, float]:
        self._state.done = True
        ok, reason = verify(self.workdir, self.check)
        if last is not None:  # ran out of steps: the last command's output is the next state
            return last, True, 1.0 if ok else 0.0
        if ok:
            return Observation("user", PERFECT), True, 1.0
        return Observation("user", NOT_DONE.format(reason=reason)), True, 0.0

    def close(self) -> None:
        if self.workdir is not None:
            self._cleanup()
            self.workdir = None

    # -- one command --------------------------------------------------------------------------

    def run(self, command: str) -> str:
        """Runs one command line in the episode directory; returns the tool output text."""
        try:
            tokens = shlex.split(command)
        except ValueError as e:
            return f"ERROR cannot parse the command: {e}"
        if not tokens:
            return "ERROR empty command"
        redirect, mode = None, "w"
        if len(tokens) >= 2 and tokens[-2] in (">", ">>"):
            redirect, mode, tokens = tokens[-1], "a" if tokens[-2] == ">>" else "w", tokens[:-2]
        elif tokens[-1].startswith(">") and len(tokens[-1].lstrip(">")) > 0:
            mode = "a" if tokens[-1].startswith(">>") else "w"
            redirect, tokens = tokens[-1].lstrip(">"), tokens[:-1]
        if not tokens:
            return "ERROR no command before the redirect"
        program, args = tokens[0], tokens[1:]
        if program not in self.commands:
            return f"ERROR command {program!r} is not allowed; allowed: {', '.join(sorted(self.commands))}"
        for token in args + ([redirect] if redirect is not None else []):
            if token in SHELL_OPERATORS or token.startswith(("$(", "`", ">", "<")):
                return f"ERROR shell operator {token!r} is not supported; run one command, optionally ending in > FILE"
            if escapes_directory(token):
                return f"ERROR path {token!r} is outside the working directory"
        try:
            output, returncode = self._execute([self.commands[program], *args], redirect, mode)
        except subprocess.TimeoutExpired:
            return f"ERROR timed out after {self.time_limit_s:g} s"
        except (OSError, ValueError) as e:  # e.g. a missing file, a NUL byte in an argument
            return f"ERROR {getattr(e, 'strerror', None) or e}"
        finally:
            self._remove_escaping_links()
        status = "OK" if returncode == 0 else f"ERROR exit {returncode}"
        return f"{status}\n{output}" if output else status

    def _execute(self, argv: list[str], redirect: str | None, mode: str) -> tuple[str, int]:
        env = {"PATH": SYSTEM_PATH, "HOME": self.workdir, "LC_ALL": "C", "LANG": "C"}
        prefix = network_isolation() + _file_size_limit_prefix(self.max_file_bytes)
        with tempfile.TemporaryFile() as captured:
            target = None
            if redirect is not None:
                path = os.path.realpath(os.path.join(self.workdir, redirect))
                if os.path.commonpath([path, self.workdir]) != self.workdir or path == self.workdir:
                    raise OSError(0, f"redirect target {redirect!r} is outside the working directory")
                target = open(path, mode + "b")
            try:
                process = subprocess.Popen(
                    [*prefix, *argv], cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                    stdout=target or captured, stderr=captured if target else subprocess.STDOUT,
                    start_new_session=True)
                try:
                    process.wait(timeout=self.time_limit_s)
                except subprocess.TimeoutExpired:
                    _kill_group(process)
                    raise
            finally:
                if target is not None:
                    target.close()
            total = captured.seek(0, os.SEEK_END)
            captured.seek(0)
            output = captured.read(4 * self.max_output_chars + 4096).decode("utf-8", "replace")
        return truncate(output, self.max_output_chars, total), process.returncode

    def _remove_escaping_links(self) -> None:
        for dirpath, dirnames, filenames in os.walk(self.workdir):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                if os.path.islink(path):
                    real = os.path.realpath(path)
                    if os.path.commonpath([real, self.workdir]) != self.workdir:
                        os.unlink(path)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, 9)
    except ProcessLookupError:
        pass
    process.wait()


def _parse_check(check: Any) -> dict[str, Any]:
    kinds = ("content", "contains", "exists")
    if (not isinstance(check, Mapping) or not isinstance(check.get("path"), str)
            or sum(k in check for k in kinds) != 1):
        raise EnvError("terminal", "task['check']", check,
                       "{'path': relpath} plus exactly one of 'content', 'contains', 'exists'")
    _check_relative_file("task['check']['path']", check["path"])
    kind = next(k for k in kinds if k in check)
    expected_type = bool if kind == "exists" else str
    if not isinstance(check[kind], expected_type):
        raise EnvError("terminal", f"task['check'][{kind!r}]", check[kind], f"a {expected_type.__name__}")
    return dict(check)


def _check_relative_file(field: str, path: str) -> None:
    if (not path or escapes_directory(path) or path.endswith("/")
            or os.path.normpath(path) == "."):
        raise EnvError("terminal", field, path, "a relative file path inside the directory")


def verify(workdir: str, check: Mapping[str, Any]) -> tuple[bool, str]:
    """The task's check against the directory: (passed, why not)."""
    path = os.path.join(workdir, check["path"])
    if "exists" in check:
        exists = os.path.lexists(path)
        if exists == check["exists"]:
            return True, ""
        return False, f"{check['path']} {'does not exist' if check['exists'] else 'still exists'}"
    if not os.path.isfile(path):
        return False, f"there is no file {check['path']}"
    with open(path, errors="replace") as f:
        text = f.read(1 << 20)
    if "content" in check:
        if text.removesuffix("\n") == check["content"].removesuffix("\n"):
            return True, ""
        return False, f"{check['path']} does not hold the expected content"
    if check["contains"] in text:
        return True, ""
    return False, f"{check['path']} does not contain {check['contains']!r}"


_WORDS = ("hello", "apple", "river", "green", "seven", "cloud")


def make_task(seed: int, prefix: str = "term") -> dict[str, Any]:
    """A small file task: write a word, make a nested file, or sort a list of numbers."""
    rng = random.Random(seed)
    kind = rng.randrange(3)
    task: dict[str, Any] = {"env": "terminal", "task_id": f"{prefix}-{seed}"}
    if kind == 0:
        name, word = rng.choice(_WORDS[:3]), rng.choice(_WORDS)
        task.update(instruction=f"Create a file named {name}.txt that contains the word {word}.",
                    check={"path": f"{name}.txt", "contains": word})
    elif kind == 1:
        folder, name = rng.sample(_WORDS, 2)
        task.update(instruction=f"Make a directory named {folder} with an empty file named {name}.txt inside it.",
                    check={"path": f"{folder}/{name}.txt", "exists": True})
    else:
        numbers = [rng.randint(1, 99) for _ in range(5)]
        task.update(instruction="The file numbers.txt holds one number per line. Write them sorted "
                                "from small to large, one per line, into sorted.txt.",
                    files={"numbers.txt": "".join(f"{n}\n" for n in numbers)},
                    check={"path": "sorted.txt", "content": "".join(f"{n}\n" for n in sorted(numbers))})
    return task
