"""`python -m clawjax.bench buffer`: the rollout buffer against a bare gRPC echo of the same bytes.

Both servers run as subprocesses on loopback; this process is the client side.
1. Throughput: `--samples` samples (`--tokens` tokens each, half response, teacher log-probs)
   go push → stream → ack through the buffer (fsync on, `--pushers` pushing threads, batches of
   `--batch`) and, as the baseline, the same serialized batches go up and back down through a
   bare gRPC echo service (bytes in, same bytes out). After one uncounted warm-up round each,
   echo and buffer rounds alternate and the medians are compared (shared hosts are noisy). A
   third line shows the disk's own bound: the same bytes appended with one fdatasync per group. Figure: MB/s of sample bytes, and the ratio
   buffer / echo (target ≥ 0.5). The buffer's cost per sample is mostly fixed (validation,
   numpy conversion), so the ratio grows with sample size: try `--tokens 2048` as well.
2. Latency at a steady `--rate` samples/s for `--seconds`: a paced pusher (10 samples per push)
   and a trainer-like consumer: lease up to 256 → ack → 5 ms of "work" → lease again. Lease
   latency = the Lease RPC round trip (client call to samples in hand; target p99 < 20 ms). Also
   shown: Ack and Push round trips, and delivery latency (push returned, i.e. durable → leased,
   which includes the consumer's 5 ms work gaps).
3. With `--breakdown`, each half of the round alone, against the matching half of a bare gRPC
   round trip: push only (durable, nobody consuming) vs an upload-only echo (the same request
   bytes in, an empty answer out), and stream + ack of what was pushed vs a download-only echo
   (a small request, the same answer bytes out). Shows which half of the buffer's path costs
   what (one round each, after the throughput rounds).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from clawjax.buffer import BufferClient, wire
from clawjax.buffer.testing import ServerProcess
from clawjax.sample import Sample

_ECHO_SERVER = r"""
import concurrent.futures, sys, grpc
server = grpc.server(concurrent.futures.ThreadPoolExecutor(16), options=[
    ("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)])
ident = lambda b: b
echo = grpc.unary_unary_rpc_method_handler(lambda req, ctx: req, ident, ident)
up = grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"", ident, ident)
answers = {}  # Down: the request is the answer's size in ASCII; one buffer per size
def answer(req, ctx):
    if req not in answers:
        answers[req] = bytes(int(req))
    return answers[req]
down = grpc.unary_unary_rpc_method_handler(answer, ident, ident)
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
    "bench.Echo", {"Echo": echo, "Up": up, "Down": down}),))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(f"echo listening on 127.0.0.1:{port}", flush=True)
sys.stdin.read()
"""


ACK_EVERY = 64  # the buffer round's consumer acks in groups of this many


def make_samples(n: int, tokens: int, seed: int = 0, prefix: str = "b") -> list[Sample]:
    rng = np.random.default_rng(seed)
    r = tokens // 2
    return [Sample(f"{prefix}{i}", rng.integers(0, 150_000, size=tokens), r,
                   rollout_logp=-rng.random(r), teacher_logp=-rng.random(r), kind="both",
                   reward=1.0, policy_version=1)
            for i in range(n)]


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q)) if values else float("nan")


def _run_all(threads: list[threading.Thread]) -> float:
    """Starts every thread, joins them all; returns the seconds in between."""
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def bench_echo(batches: list[bytes], pushers: int, method: str = "Echo") -> float:
    """Seconds to send every batch up and receive it back through the echo service. `method`
    "Up" sends each batch and gets an empty answer; "Down" asks for each batch's size and
    gets that many bytes back."""
    import grpc
    proc = subprocess.Popen([sys.executable, "-c", _ECHO_SERVER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        address = proc.stdout.readline().split()[-1]
        options = [("grpc.max_receive_message_length", 256 << 20)]
        channels = [grpc.insecure_channel(address, options=options) for _ in range(pushers)]
        calls = [ch.unary_unary(f"/bench.Echo/{method}") for ch in channels]
        calls[0](b"7" if method == "Down" else b"warm-up", timeout=30)
        if method == "Down":
            batches = [str(len(b)).encode() for b in batches]
            want = [int(b) for b in batches]
        else:
            want = [0 if method == "Up" else len(b) for b in batches]

        def run(k: int) -> None:
            for batch, size in zip(batches[k::pushers], want[k::pushers]):
                assert len(calls[k](batch, timeout=60)) == size

        elapsed = _run_all([threading.Thread(target=run, args=(k,)) for k in range(pushers)])
        for ch in channels:
            ch.close()
        return elapsed
    finally:
        proc.stdin.close()
        proc.wait(10)


def bench_disk(directory: str, batches: list[bytes], pushers: int) -> float:
    """Seconds to append the pushes' bytes to a file with one write + fdatasync per group of
    `pushers` batches: the fsync bandwidth that bounds any durable buffer on this disk."""
    import os
    path = os.path.join(directory, "disk-bound.bin")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        t0 = time.perf_counter()
        for i in range(0, len(batches), pushers):
            os.writev(fd, batches[i:i + pushers])
            os.fdatasync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)


def _pushers(address: str, batches: list[list[Sample]], pushers: int
             ) -> tuple[list[threading.Thread], list[BufferClient]]:
    """`pushers` threads (not started), each with its own client, pushing every `pushers`-th
    batch in turn."""
    clients = [BufferClient(address) for _ in range(pushers)]

    def push(k: int) -> None:
        for batch in batches[k::pushers]:
            clients[k].push(batch)

    return [threading.Thread(target=push, args=(k,)) for k in range(pushers)], clients


def _consume(consumer: BufferClient, total: int) -> None:
    """Streams and acks `total` samples (in flight 512, acks of `ACK_EVERY`)."""
    acked, pending = 0, []
    stream = consumer.stream(max_in_flight=512)
    for sample in stream:
        pending.append(sample.sample_id)
        if len(pending) >= ACK_EVERY or acked + len(pending) == total:
            consumer.ack(pending)
            acked += len(pending)
            pending = []
            if acked == total:
                break
    stream.close()


def bench_buffer(address: str, batches: list[list[Sample]], pushers: int) -> float:
    """Seconds from the first push to the last ack of every sample (push → stream → ack)."""
    threads, clients = _pushers(address, batches, pushers)
    consumer = BufferClient(address)
    consumer.stats()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    _consume(consumer, sum(len(b) for b in batches))
    elapsed = time.perf_counter() - t0
    for t in threads:
        t.join()
    for c in clients + [consumer]:
        c.close()
    return elapsed


def bench_push_only(address: str, batches: list[list[Sample]], pushers: int) -> float:
    """Seconds to push every batch (durable on return) with nobody consuming."""
    threads, clients = _pushers(address, batches, pushers)
    elapsed = _run_all(threads)
    for c in clients:
        c.close()
    return elapsed


def bench_drain(address: str, total: int) -> float:
    """Seconds to stream and ack `total` samples already in the buffer (as `bench_buffer`'s
    consumer)."""
    with BufferClient(address) as consumer:
        consumer.stats()
        t0 = time.perf_counter()
        _consume(consumer, total)
        return time.perf_counter() - t0


def bench_latency(address: str, rate: float, seconds: float, tokens: int) -> dict[str, list]:
    """Paced pushes of 10 samples every 10/rate s; a consumer leases, acks, works 5 ms."""
    per_push = 10
    n_pushes = int(rate * seconds / per_push)
    batches = [make_samples(per_push, tokens, seed=i, prefix=f"lat{i}-") for i in range(n_pushes)]
    pushed_at: dict[str, float] = {}
    lat: dict[str, list] = {"delivery": [], "lease_rpc": [], "ack_rpc": [], "push_rpc": []}
    producer, consumer = BufferClient(address), BufferClient(address)
    done = threading.Event()

    def produce() -> None:
        start = time.perf_counter()
        for i, batch in enumerate(batches):
            delay = start + i * per_push / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            t0 = time.perf_counter()
            producer.push(batch)
            t1 = time.perf_counter()
            lat["push_rpc"].append(t1 - t0)
            for s in batch:
                pushed_at[s.sample_id] = t1
        done.set()

    thread = threading.Thread(target=produce)
    thread.start()
    received = 0
    while received < n_pushes * per_push:
        t0 = time.perf_counter()
        got = consumer.lease(256, timeout_s=1.0)
        t1 = time.perf_counter()
        if not got:
            continue
        lat["lease_rpc"].append(t1 - t0)
        for s in got:  # the push may return to its thread a hair after the lease does
            lat["delivery"].append(max(0.0, t1 - pushed_at.get(s.sample_id, t1)))
        t2 = time.perf_counter()
        consumer.ack([s.sample_id for s in got])
        lat["ack_rpc"].append(time.perf_counter() - t2)
        received += len(got)
        time.sleep(0.005)
    thread.join()
    producer.close()
    consumer.close()
    return lat


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m clawjax.bench buffer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per sample (half response)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--pushers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3,
                   help="alternating echo/buffer rounds; medians are reported (noisy hosts)")
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--latency-tokens", type=int, default=2048)
    p.add_argument("--breakdown", action="store_true",
                   help="also time each half (push only; stream + ack) against its echo half")
    args = p.parse_args(argv)

    rounds = []
    for r in range(args.rounds):
        samples = make_samples(args.samples, args.tokens, seed=r, prefix=f"r{r}-")
        rounds.append([samples[i:i + args.batch] for i in range(0, len(samples), args.batch)])
    wire_bytes = [[wire.encode_sample(s) for s in b] for b in rounds[0]]
    nbytes = sum(len(w) for b in wire_bytes for w in b)
    echo_batches = [wire.join_repeated(b) for b in wire_bytes]
    print(f"bench buffer: {args.samples} samples x {args.tokens} tokens "
          f"({nbytes / args.samples / 1024:.1f} KiB each, {nbytes / 1e6:.1f} MB) per round, "
          f"batches of {args.batch}, {args.pushers} pushers, fsync on, {args.rounds} rounds")
    echo_s, buffer_s, disk_s = [], [], []
    warm = make_samples(args.samples, args.tokens, seed=99, prefix="warm-")
    with tempfile.TemporaryDirectory() as tmp:
        with ServerProcess(tmp, "--lease-timeout-s", "60", "--max-bytes", str(8 << 30)) as proc:
            bench_echo(echo_batches, args.pushers)   # one full, uncounted warm-up round each
            bench_buffer(proc.address, [warm[i:i + args.batch]
                                        for i in range(0, len(warm), args.batch)], args.pushers)
            with BufferClient(proc.address) as c:
                fsyncs_before = c.stats()["fsyncs_total"]
            for batches in rounds:
                echo_s.append(bench_echo(echo_batches, args.pushers))
                buffer_s.append(bench_buffer(proc.address, batches, args.pushers))
                disk_s.append(bench_disk(tmp, echo_batches, args.pushers))
            with BufferClient(proc.address) as c:
                stats = c.stats()
            halves = None
            if args.breakdown:
                split = make_samples(args.samples, args.tokens, seed=7, prefix="half-")
                up_s = bench_echo(echo_batches, args.pushers, "Up")
                push_s = bench_push_only(proc.address, [split[i:i + args.batch] for i in
                                                        range(0, len(split), args.batch)],
                                         args.pushers)
                down_s = bench_echo(echo_batches, args.pushers, "Down")
                drain_s = bench_drain(proc.address, args.samples)
                halves = (up_s, push_s, down_s, drain_s)
            lat = bench_latency(proc.address, args.rate, args.seconds, args.latency_tokens)
    echo_mbs = [nbytes / t / 1e6 for t in echo_s]
    buffer_mbs = [nbytes / t / 1e6 for t in buffer_s]
    echo_med, buffer_med = float(np.median(echo_mbs)), float(np.median(buffer_mbs))
    print("throughput  echo (bare gRPC, same bytes up and down): median "
          f"{echo_med:7.1f} MB/s  rounds {', '.join(f'{x:.1f}' for x in echo_mbs)}")
    print("throughput  buffer push -> stream -> ack (fsync):     median "
          f"{buffer_med:7.1f} MB/s  rounds {', '.join(f'{x:.1f}' for x in buffer_mbs)}"
          f"  ({args.samples / float(np.median(buffer_s)):.0f} samples/s; "
          f"{stats['fsyncs_total'] - fsyncs_before} fsyncs for {args.rounds * len(rounds[0])} "
          f"pushes + {args.rounds * -(-args.samples // ACK_EVERY)} acks)")
    disk_mbs = [nbytes / t / 1e6 for t in disk_s]
    print("bound       disk write + fdatasync, same bytes:     median "
          f"{float(np.median(disk_mbs)):7.1f} MB/s  rounds {', '.join(f'{x:.1f}' for x in disk_mbs)}")
    ratio = buffer_med / echo_med
    print(f"ratio buffer / echo: {ratio:.2f}x (target >= 0.5x): {'ok' if ratio >= 0.5 else 'MISSED'}")
    if halves is not None:
        up_s, push_s, down_s, drain_s = halves
        print(f"halves      push only (durable) {nbytes / push_s / 1e6:7.1f} MB/s vs upload-only "
              f"echo {nbytes / up_s / 1e6:7.1f} MB/s: {up_s / push_s:.2f}x")
        print(f"            stream + ack        {nbytes / drain_s / 1e6:7.1f} MB/s vs "
              f"download-only echo {nbytes / down_s / 1e6:7.1f} MB/s: {down_s / drain_s:.2f}x")
    print(f"latency at {args.rate:.0f} samples/s of {args.latency_tokens} tokens for "
          f"{args.seconds:.0f} s ({len(lat['delivery'])} samples, {len(lat['lease_rpc'])} leases):")
    for name, label in (("lease_rpc", "lease latency (Lease RPC)"), ("ack_rpc", "Ack RPC"),
                        ("push_rpc", "Push RPC (10 samples, fsync)"),
                        ("delivery", "delivery (durable -> leased)")):
        print(f"  {label:30s} p50 {_pct(lat[name], 50):7.2f} ms   p99 {_pct(lat[name], 99):7.2f} ms")
    p99 = _pct(lat["lease_rpc"], 99)
    print(f"lease latency p99 {p99:.2f} ms (target < 20 ms): {'ok' if p99 < 20 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
