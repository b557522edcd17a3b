"""`python -m clawjax.bench buffer` runs end to end at a tiny size and prints its figures (the
figures themselves are machine-dependent and not asserted)."""

import re
import subprocess
import sys


def test_bench_buffer_smoke():
    out = subprocess.run(
        [sys.executable, "-m", "clawjax.bench", "buffer", "--samples", "64", "--tokens", "256",
         "--batch", "8", "--pushers", "2", "--rounds", "1", "--rate", "200", "--seconds", "0.5",
         "--breakdown"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"ratio buffer / echo: \d+\.\d\dx", out.stdout), out.stdout
    assert re.search(r"lease latency \(Lease RPC\)\s+p50\s+\d+\.\d+ ms\s+p99\s+\d+\.\d+ ms",
                     out.stdout), out.stdout
    assert "echo (bare gRPC" in out.stdout and "disk write + fdatasync" in out.stdout
    assert re.search(r"push only \(durable\)\s+\d+\.\d MB/s vs upload-only echo\s+\d+\.\d "
                     r"MB/s: \d+\.\d\dx", out.stdout), out.stdout
    assert re.search(r"stream \+ ack\s+\d+\.\d MB/s vs download-only echo\s+\d+\.\d MB/s: "
                     r"\d+\.\d\dx", out.stdout), out.stdout


def test_bench_compaction_smoke():
    out = subprocess.run(
        [sys.executable, "-m", "clawjax.bench", "compaction", "--finished", "3000", "--new", "100",
         "--rounds", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"ratio with 3,000 finished ids / without: \d+\.\d\dx", out.stdout), out.stdout
    assert re.search(r"history\s+3,000 finished ids before .* done\.log 0\.\d MB", out.stdout), \
        out.stdout


def test_bench_doneset_smoke():
    out = subprocess.run(
        [sys.executable, "-m", "clawjax.bench", "doneset", "--ids", "60000", "--calls", "20"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"ratio memory DoneSet / set: \d+\.\d\dx; ratio push check time DoneSet / "
                     r"set: \d+\.\d\dx", out.stdout), out.stdout
    assert re.search(r"one consolidation of [\d,]+ recent ids into 60,000", out.stdout), out.stdout
    assert re.search(r"restart, 60,000 finished ids from done.log: stored digests \d+\.\d+ s, "
                     r"ids hashed \d+\.\d+ s, python set of the ids \d+\.\d+ s",
                     out.stdout), out.stdout
    assert re.search(r"ratio restart stored digests / ids hashed: \d+\.\d\dx",
                     out.stdout), out.stdout
