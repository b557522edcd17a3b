"""Terminal environment: scripted tasks reach the right outcome; the sandbox cannot write outside
its directory, exceeds no time limit, has no network, truncates output."""

import os
import socket
import subprocess
import threading

import pytest

from clawjax.rollout.envs import EnvError, Observation, TerminalEnv
from clawjax.rollout.envs import terminal


def tree(path):
    """Every path under `path` with its content (files) or None (directories), as a dict."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for d in dirnames:
            out[os.path.join(dirpath, d)] = None
        for f in filenames:
            full = os.path.join(dirpath, f)
            out[full] = open(full, "rb").read() if not os.path.islink(full) else os.readlink(full)
    return out


@pytest.fixture
def sandbox(tmp_path):
    """An env whose temporary directories live in tmp_path/root, beside a sentinel file."""
    (tmp_path / "root").mkdir()
    (tmp_path / "sentinel.txt").write_text("keep me\n")
    env = TerminalEnv(root=str(tmp_path / "root"), time_limit_s=5)
    yield env
    env.close()


def word_task():
    return {"env": "terminal", "task_id": "w", "instruction": "Write hello into hello.txt.",
            "check": {"path": "hello.txt", "content": "hello"}, "max_steps": 100}


def test_scripted_generated_tasks_succeed(sandbox):
    solutions = {  # the commands that solve each kind of generated task
        "contains": lambda t: [f"$ echo {t['check']['contains']} > {t['check']['path']}"],
        "exists": lambda t: [f"$ mkdir {t['check']['path'].split('/')[0]}",
                             f"```sh\ntouch {t['check']['path']}\n```"],
        "content": lambda t: ["$ sort -n numbers.txt > sorted.txt", "$ cat sorted.txt"],
    }
    seen = set()
    for seed in range(12):
        task = terminal.make_task(seed)
        kind = next(k for k in solutions if k in task["check"])
        seen.add(kind)
        first = sandbox.reset(task)
        assert first.role == "user" and "DONE" in first.text
        for command in solutions[kind](task):
            obs, done, outcome = sandbox.step(command)
            assert obs.role == "tool" and obs.text.startswith("OK"), (command, obs)
            assert not done and outcome == 0.0
        obs, done, outcome = sandbox.step("DONE")
        assert (obs, done, outcome) == (Observation("user", terminal.PERFECT), True, 1.0), task
    assert seen == set(solutions)


def test_done_without_the_work_fails_with_a_correction(sandbox):
    sandbox.reset(word_task())
    assert sandbox.step("$ echo hullo > hello.txt")[0].text == "OK"
    obs, done, outcome = sandbox.step("DONE")
    assert done and outcome == 0.0 and obs.role == "user"
    assert "not right" in obs.text and "hello.txt" in obs.text and "Please" in obs.text


@pytest.mark.parametrize("reply", ["DONE", "done.", "I wrote the file.\nDONE!"])
def test_done_spellings(sandbox, reply):
    sandbox.reset(dict(word_task(), files={"hello.txt": "hello\n"}))
    assert sandbox.step(reply) == (Observation("user", terminal.PERFECT), True, 1.0)


def test_max_steps_ends_with_the_verified_outcome(sandbox):
    task = dict(word_task(), max_steps=2)
    sandbox.reset(task)
    sandbox.step("$ ls")
    obs, done, outcome = sandbox.step("$ echo hello > hello.txt")
    assert (obs.text, done, outcome) == ("OK", True, 1.0)


def test_cannot_write_outside_its_directory(sandbox, tmp_path):
    sandbox.reset(dict(word_task(), files={"a.txt": "data\n", "sub/b.txt": "b\n"}))
    workdir = sandbox.workdir
    assert os.path.dirname(workdir) == str(tmp_path / "root")
    outside = str(tmp_path)
    before = {p: c for p, c in tree(outside).items() if not p.startswith(workdir)}
    attempts = [
        f"$ touch {outside}/escaped.txt", "$ echo hi > ../escaped.txt", "$ echo hi >../escaped.txt",
        "$ echo hi >> ../../sentinel.txt", "$ cp a.txt ../escaped.txt", "$ mkdir ../escaped",
        "$ mv a.txt sub/../../escaped.txt", f"$ cp a.txt --target-directory={outside}",
        f"$ cp -t{outside} a.txt", "$ touch ~/escaped.txt", "$ rm ../../sentinel.txt",
        f"$ cp a.txt {outside}/root/escaped.txt", "$ mv sub ..", "$ cat ../../sentinel.txt",
    ]
    for attempt in attempts:
        obs, done, _ = sandbox.step(attempt)
        assert obs.role == "tool" and obs.text.startswith("ERROR path"), (attempt, obs.text)
    after = {p: c for p, c in tree(outside).items() if not p.startswith(workdir)}
    assert after == before
    # Inside writes still work, and HOME is the directory itself.
    assert sandbox.step("$ cp a.txt sub/c.txt")[0].text == "OK"
    assert open(os.path.join(workdir, "sub", "c.txt")).read() == "data\n"
    assert sandbox.step("$ pwd")[0].text == f"OK\n{workdir}\n"


def test_a_parent_directory_glued_to_a_short_option_is_refused(sandbox, tmp_path):
    """`cp -t.. f` names the parent directory as cleanly as `cp -t /x f` names another one."""
    sandbox.reset(dict(word_task(), files={"a.txt": "data\n"}))
    workdir = sandbox.workdir
    before = {p: c for p, c in tree(str(tmp_path)).items() if not p.startswith(workdir)}
    for attempt in ("$ cp -t.. a.txt", "$ mv -t.. a.txt", "$ cp -vt.. a.txt"):
        obs, _, _ = sandbox.step(attempt)
        assert obs.text.startswith("ERROR path"), (attempt, obs.text)
    after = {p: c for p, c in tree(str(tmp_path)).items() if not p.startswith(workdir)}
    assert after == before
    for token in ("-t..", "-vt..", "-t../x"):
        assert terminal.escapes_directory(token), token
    for token in ("-t.", "-tsub", "-t..x"):
        assert not terminal.escapes_directory(token), token


def test_links_that_point_outside_are_neither_followed_nor_kept(sandbox, tmp_path):
    sandbox.reset(word_task())
    link = os.path.join(sandbox.workdir, "link.txt")
    os.symlink(str(tmp_path / "sentinel.txt"), link)  # as if a command had made one
    obs = sandbox.step("$ echo overwritten > link.txt")[0]
    assert obs.text.startswith("ERROR") and "outside" in obs.text
    assert (tmp_path / "sentinel.txt").read_text() == "keep me\n"
    assert not os.path.lexists(link)  # removed after the command


def test_disallowed_commands_and_shell_operators(sandbox):
    sandbox.reset(word_task())
    for command in ("curl http://example.com", "wget x", "nc -l 9", "python3 -c 1", "bash",
                    "sh -c ls", "ssh host", "ln -s . x", "/bin/ls"):
        obs = sandbox.step(f"$ {command}")[0]
        assert obs.text.startswith("ERROR command"), (command, obs.text)
    for command in ("cat a.txt | sort", "ls ; ls", "echo $(id)", "echo `id`", "sort < a.txt",
                    "ls && ls"):
        obs = sandbox.step(f"$ {command}")[0]
        assert obs.text.startswith("ERROR shell operator"), (command, obs.text)
    assert sandbox.step("Let me think about it.\nFirst this, then that.")[0].text.startswith("ERROR no command")
    assert sandbox.step("$ cat missing.txt")[0].text.startswith("ERROR exit 1")
    assert sandbox.step("$ cat 'a\x00b'")[0].text.startswith("ERROR")
    assert sandbox.step("$ echo 'unclosed")[0].text.startswith("ERROR cannot parse")


def _alive_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_time_limit_kills_the_command(tmp_path):
    env = TerminalEnv(root=str(tmp_path), time_limit_s=0.5, allowed_commands=("sleep", "ls"))
    env.reset(word_task())
    obs, done, _ = env.step("$ sleep 29.125")
    assert obs.text == "ERROR timed out after 0.5 s" and not done
    assert _alive_with("29.125") == []
    assert env.step("$ ls")[0].text == "OK"  # the episode goes on
    env.close()


def test_no_network(tmp_path):
    isolation = terminal.network_isolation()
    if not isolation:
        pytest.skip("unshare -n is refused here: the allow-list alone keeps commands off the network")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted = []
    listener.settimeout(0.2)

    def accept():
        try:
            accepted.append(listener.accept()[0])
        except OSError:
            pass

    # The probe connects when run outside the sandbox (so it can detect a network)...
    probe = f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected"
    thread = threading.Thread(target=accept)
    thread.start()
    direct = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=10)
    thread.join()
    assert direct.stdout.strip() == "connected" and len(accepted) == 1
    # ...and fails inside it.
    env = TerminalEnv(root=str(tmp_path), allowed_commands=("bash",))
    env.reset(word_task())
    obs = env.step(f"$ bash -c '{probe}'")[0]
    env.close()
    thread = threading.Thread(target=accept)
    thread.start()
    thread.join()
    assert obs.text.startswith("ERROR exit 1") and "\nconnected" not in obs.text, obs.text
    assert len(accepted) == 1
    for sock in accepted:
        sock.close()
    listener.close()


def test_output_is_truncated(tmp_path):
    env = TerminalEnv(root=str(tmp_path), max_output_chars=100)
    env.reset(word_task())
    obs = env.step("$ seq 1 100000")[0]
    total = sum(len(str(i)) + 1 for i in range(1, 100001))
    head = "".join(f"{i}\n" for i in range(1, 100))[:100]
    assert obs.text == f"OK\n{head}\n... [output truncated: {total} bytes in all]"
    env.close()


def test_file_size_limit(tmp_path):
    if terminal._file_size_limit_prefix(1000) == ():
        pytest.skip("prlimit is not installed")
    env = TerminalEnv(root=str(tmp_path), max_file_bytes=1000)
    env.reset(word_task())
    obs = env.step("$ seq 1 1000000 > big.txt")[0]
    assert obs.text.startswith("ERROR exit")
    assert os.path.getsize(os.path.join(env.workdir, "big.txt")) <= 1000
    env.close()


def test_fresh_directory_per_episode_and_close_removes_it(sandbox):
    sandbox.reset(word_task())
    first = sandbox.workdir
    sandbox.step("$ touch leftover.txt")
    sandbox.reset(word_task())
    assert sandbox.workdir != first and not os.path.exists(first)
    assert sandbox.step("$ ls")[0].text == "OK"
    second = sandbox.workdir
    sandbox.close()
    assert not os.path.exists(second)


def test_bad_tasks_and_settings(sandbox):
    with pytest.raises(EnvError, match=r"task\['check'\]"):
        sandbox.reset({"task_id": "t", "instruction": "x", "check": {"path": "a"}})
    with pytest.raises(EnvError, match=r"task\['check'\]\['path'\] = '../a'"):
        sandbox.reset({"task_id": "t", "instruction": "x", "check": {"path": "../a", "exists": True}})
    with pytest.raises(EnvError, match=r"task\['files'\] path = '/etc/x'"):
        sandbox.reset(dict(word_task(), files={"/etc/x": "y"}))
    for path in ("sub/", ".", "./", ""):
        with pytest.raises(EnvError, match="a relative file path"):
            sandbox.reset(dict(word_task(), files={path: "y"}))
    with pytest.raises(EnvError, match=r"task\['check'\]\['exists'\] = 'yes'"):
        sandbox.reset({"task_id": "t", "instruction": "x", "check": {"path": "a", "exists": "yes"}})
    with pytest.raises(EnvError, match="allowed_commands = 'no-such-program'"):
        TerminalEnv(allowed_commands=("no-such-program",))
    with pytest.raises(EnvError, match="time_limit_s = 0"):
        TerminalEnv(time_limit_s=0)


def test_escape_and_command_extraction_rules():
    for token in ("/etc", "~", "~/x", "..", "../x", "a/../../x", "x/..", "--dir=/x", "-t/x", "--f=.."):
        assert terminal.escapes_directory(token), token
    for token in ("a.txt", "sub/b.txt", "-n", "--lines=3", "a..b", "..hidden", "x=y"):
        assert not terminal.escapes_directory(token), token
    assert terminal.extract_command("I will list.\n$ ls -l\n$ pwd") == "ls -l"
    assert terminal.extract_command("Here:\n```bash\n\ncat a.txt\nls\n```") == "cat a.txt"
    assert terminal.extract_command("  ls  ") == "ls"
    assert terminal.extract_command("two\nlines") is None
