"""The trainer when the gRPC buffer goes away (a real buffer process, SIGKILLed and restarted on
its directory and port): an outage is a wait for samples, not a crash; acknowledgements that do
not get through stay pending and a sample the restarted buffer redelivers is never trained
twice; a permanent refusal (a rotated token) ends the run only after the trained steps are
checkpointed."""

from __future__ import annotations

import json
import threading

import pytest

from clawjax.buffer import AuthenticationError, BufferClient
from clawjax.buffer.testing import ServerProcess
from clawjax.loop import TrainLoop
from sample_factory import make_samples
from test_trainer import tiny_config

OUTAGE = {"trainer.samples_per_step": 4, "trainer.take_timeout_s": 1.0,
          "buffer.keepalive_s": 0.5}


def ids(samples) -> set[str]:
    return {s.sample_id for s in samples}


def checkpoint_meta(workdir, step: int) -> dict:
    """The JSON meta of checkpoint `step`, read from disk as a resume reads it."""
    found = [p for p in (workdir / "checkpoints" / str(step) / "meta").iterdir()
             if p.is_file() and not p.name.startswith("_")]
    return json.loads(found[0].read_text())


def test_a_buffer_outage_is_a_wait_and_no_sample_is_trained_twice(tmp_path):
    """Checkpoints 2 and 3 commit while the buffer is down: their acknowledgements stay pending,
    and checkpoint 3's meta (all a resume reads) lists step 2's samples as well as its own. The
    next take waits through the outage; once the buffer is back (it requeues every leased,
    unacknowledged sample) the pending ones are acknowledged, none is trained again."""
    samples = make_samples(16, seed=41)
    workdir = tmp_path / "run"
    with ServerProcess(str(tmp_path / "buffer"), "--lease-timeout-s", "300") as server:
        client = BufferClient(server.address)
        client.push(samples)
        loop = TrainLoop(tiny_config(workdir, **OUTAGE, **{"buffer.address": server.address}))
        try:
            first = loop.take_samples()
            loop.train_step(first)
            loop.save_checkpoint()
            loop.checkpointer.wait()  # acknowledged: the buffer has finished them
            second = loop.take_samples()
            loop.train_step(second)
            third = loop.take_samples()
            server.kill()
            loop.save_checkpoint()  # the acknowledgement cannot get through: pending, no error
            loop.checkpointer.wait()
            assert loop.source.ack_pending == ids(second)
            loop.train_step(third)
            loop.save_checkpoint()
            loop.checkpointer.wait()
            assert loop.source.ack_pending == ids(second) | ids(third)
            assert set(checkpoint_meta(workdir, 3)["unacked_ids"]) == ids(second) | ids(third)

            taken, errors = [], []

            def take():
                try:
                    taken.append(loop.take_samples())
                except Exception as e:  # noqa: BLE001 (the test reports it)
                    errors.append(e)
            waiting = threading.Thread(target=take)
            waiting.start()
            waiting.join(3.0)  # three of the source's 1-second retry budgets
            assert waiting.is_alive() and not errors, errors
            server.restart()  # it requeues `second` and `third`: leased, never acknowledged
            waiting.join(120)
            assert not waiting.is_alive() and not errors, errors
            fourth = taken[0]
            assert ids(fourth) == ids(samples) - ids(first) - ids(second) - ids(third)
            assert not loop.source.ack_pending
            loop.train_step(fourth)
            loop.save_checkpoint()
            loop.checkpointer.wait()
            stats = client.stats()  # of the restarted process: `first` was acknowledged before
            assert (stats["acked_total"], stats["queued"], stats["leased"]) == (12, 0, 0), stats
            again = client.push(samples)  # every id finished: each is a duplicate now
            assert (again.accepted, again.duplicates) == (0, 16)
        finally:
            loop.close()
            client.close()


def test_a_refused_token_ends_the_run_after_checkpointing_the_trained_steps(tmp_path):
    token = tmp_path / "token"
    token.write_text("first-token")
    with ServerProcess(str(tmp_path / "buffer"), "--token-file", str(token)) as server:
        client = BufferClient(server.address, token="first-token")
        client.push(make_samples(8, seed=42))
        token_file = tmp_path / "trainer-token"
        token_file.write_text("first-token")
        loop = TrainLoop(tiny_config(tmp_path / "run", **OUTAGE, **{
            "buffer.address": server.address, "buffer.token_file": str(token_file),
            "trainer.steps": 3, "checkpoint.every_steps": 50}))
        ended, trained, train_step = [], threading.Semaphore(0), loop.train_step

        def counted_step(samples):   # loop.step reads donated state: not from another thread
            out = train_step(samples)
            trained.release()
            return out

        loop.train_step = counted_step
        running = threading.Thread(target=lambda: ended.append(_run(loop)))
        try:
            running.start()
            # both steps' samples trained; the third waits for samples
            assert trained.acquire(timeout=120) and trained.acquire(timeout=120), ended
            token.write_text("rotated-token")
            server.restart()
            running.join(120)
            assert not running.is_alive()
            assert isinstance(ended[0], AuthenticationError), ended
            assert loop.checkpointer.latest_step() == 2
        finally:
            if running.is_alive():
                loop.stop()
                running.join(60)
            loop.close()
            client.close()


def _run(loop):
    try:
        loop.run()
    except Exception as e:  # noqa: BLE001 (the test checks which)
        return e
    return None
