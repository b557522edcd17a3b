"""SIGKILL the buffer while 8 clients push 5,000 samples and a consumer leases and acks; restart
on the same directory and port. Acknowledged pushes are never lost, acknowledged samples are
never delivered again, and the consumer ends with exactly 5,000 unique samples."""

import threading

import numpy as np

from clawjax.buffer import BufferClient
from clawjax.buffer.testing import ServerProcess
from clawjax.sample import Sample

N_CLIENTS, TOTAL, BATCH = 8, 5000, 25


def _sample(sid: str) -> Sample:
    return Sample(sid, np.arange(24) % 97, 8, rollout_logp=np.full(8, -0.1), reward=1.0)


def test_sigkill_during_push_and_ack_loses_nothing_and_redelivers_no_acked(tmp_path):
    proc = ServerProcess(str(tmp_path), "--lease-timeout-s", "30")
    address = proc.start()
    lock = threading.Lock()
    pushed_ok: set[str] = set()      # ids whose push() returned
    acked: set[str] = set()          # ids whose ack() returned
    acked_before_kill: set[str] = set()
    delivered: list[str] = []
    violations: list[str] = []
    killed = threading.Event()
    pushers_done = threading.Event()
    errors: list[BaseException] = []

    def pusher(k: int) -> None:
        try:
            with BufferClient(address, retry_budget_s=60) as c:
                ids = [f"c{k}-{i}" for i in range(TOTAL // N_CLIENTS)]
                for i in range(0, len(ids), BATCH):
                    chunk = ids[i:i + BATCH]
                    c.push([_sample(s) for s in chunk])
                    with lock:
                        pushed_ok.update(chunk)
        except BaseException as e:  # surfaced by the main thread
            errors.append(e)

    def consumer() -> None:
        try:
            with BufferClient(address, retry_budget_s=60) as c:
                while len(acked) < TOTAL:
                    got = [s.sample_id for s in c.lease(200, timeout_s=0.5)]
                    with lock:
                        violations.extend(s for s in got if s in acked)
                        delivered.extend(got)
                    if not got:
                        if pushers_done.is_set() and len(acked) >= len(pushed_ok):
                            return
                        continue
                    c.ack(got)
                    with lock:
                        acked.update(got)
                        if not killed.is_set():
                            acked_before_kill.update(got)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=pusher, args=(k,)) for k in range(N_CLIENTS)]
    cons = threading.Thread(target=consumer)
    try:
        for t in threads + [cons]:
            t.start()
        while len(pushed_ok) < TOTAL // 3 and not errors:   # kill mid-stream
            threading.Event().wait(0.01)
        with lock:
            killed.set()
            pushed_before_kill = set(pushed_ok)
        proc.kill()
        assert proc.start() == address                      # same directory, same port
        for t in threads:
            t.join(120)
        pushers_done.set()
        cons.join(120)
        assert not errors, errors
        assert not cons.is_alive() and not any(t.is_alive() for t in threads)
    finally:
        killed.set()
        proc.stop()

    expected = {f"c{k}-{i}" for k in range(N_CLIENTS) for i in range(TOTAL // N_CLIENTS)}
    assert pushed_ok == expected
    assert pushed_before_kill and acked_before_kill, "the kill came too late to test anything"
    assert not violations, f"acked samples delivered again: {violations[:10]}"
    assert set(delivered) == expected and acked == expected        # exactly 5,000 unique
    assert pushed_before_kill <= set(delivered)
    print(f"pushed before kill {len(pushed_before_kill)}, acked before kill "
          f"{len(acked_before_kill)}, deliveries {len(delivered)} (unique {len(set(delivered))})")
    with ServerProcess(str(tmp_path)) as again, BufferClient(again.address) as c:
        stats = c.stats()
        assert stats["queued"] == 0 and stats["leased"] == 0 and stats["bytes"] == 0
