"""`python -m clawjax.serve` (and the buffer and rollout servers, for --log-level) refuse bad
arguments in argument parsing (exit 2, one `error:` line naming the flag) instead of a
traceback or a server that starts and refuses everything."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def serve(model_dir, *args):
    return subprocess.run([sys.executable, "-m", "clawjax.serve", "--model", str(model_dir),
                           "--port", "1", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    return tmp_path


@pytest.mark.parametrize("args,message", [
    (["--context-length", "0"], "--context-length = 0, expected >= 2"),
    (["--context-length", "-5"], "--context-length = -5, expected >= 2"),
    (["--context-length", "1"], "--context-length = 1, expected >= 2"),
    (["--log-level", "loud"], "argument --log-level: invalid choice: 'loud'"),
    (["--seed", "-1"], "--seed = -1, expected >= 0"),
])
def test_bad_arguments_fail_in_parsing(model_dir, args, message):
    out = serve(model_dir, *args)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "READY" not in out.stdout
    assert f"python -m clawjax.serve: error: {message}" in out.stderr, out.stderr[-3000:]


def test_log_levels_are_case_insensitive(model_dir):
    from clawjax.serve import parse_args

    for level in ("INFO", "debug", "Warning"):
        assert parse_args(["--model", str(model_dir), "--port", "1", "--log-level",
                           level]).log_level == level.lower()
    assert parse_args(["--model", str(model_dir), "--port", "1",
                       "--context-length", "2"]).context_length == 2


@pytest.mark.parametrize("module,args", [
    ("clawjax.buffer", ["serve", "--dir", "unused"]),
    ("clawjax.rollout", ["serve", "--port", "1", "--model-dir", "unused", "--policy-url",
                         "http://127.0.0.1:1", "--judge-url", "http://127.0.0.1:1",
                         "--buffer", "127.0.0.1:1"]),
])
def test_the_other_servers_refuse_an_unknown_log_level_in_parsing(module, args):
    out = subprocess.run([sys.executable, "-m", module, *args, "--log-level", "verbose"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "argument --log-level: invalid choice: 'verbose'" in out.stderr, out.stderr[-3000:]
