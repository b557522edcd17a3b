"""A 3-server fleet of `python -m clawjax.serve` subprocesses: one is SIGKILLed mid-run while
requests keep flowing; the others are updated by the publisher and keep serving; the dead one
is marked down, and once restarted it is brought to the newest weights before it serves."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clawjax import model as cm
from clawjax.publish import Publisher
from clawjax.serving.sync import SyncFleet
from test_serving_helpers import (free_port, hf_model, model_a, model_b,  # noqa: F401
                                  start_subprocess_server, token_logps, tokenizer)

TOL = 1e-4


def scored(url, ids):
    out = httpx.post(url + "/generate", timeout=60, json={
        "input_ids": ids, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
        "logprob_start_len": 0}).json()
    return (out["meta_info"]["weight_version"],
            np.array([e[0] for e in out["meta_info"]["input_token_logprobs"][1:]]))


@pytest.mark.slow
def test_fleet_survives_a_killed_server_and_updates_it_when_back(tmp_path, model_a, model_b,
                                                                 tokenizer):
    ports = [free_port() for _ in range(3)]
    cache = tmp_path / "jax_cache"
    ids = tokenizer.encode("Fleet test prompt")
    # the first server compiles (and fills the shared compilation cache), the others load it
    procs = [start_subprocess_server(model_a, ports[0], compile_cache=cache), None, None]
    scored(f"http://127.0.0.1:{ports[0]}", ids)
    httpx.post(f"http://127.0.0.1:{ports[0]}/generate", timeout=60, json={
        "input_ids": ids, "sampling_params": {"max_new_tokens": 4}})
    starters = [threading.Thread(target=lambda i=i: procs.__setitem__(
        i, start_subprocess_server(model_a, ports[i], compile_cache=cache))) for i in (1, 2)]
    for t in starters:
        t.start()
    for t in starters:
        t.join()
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    fleet = SyncFleet(urls, probe_interval=0.2, backoff=0.05, timeout=60)
    model, config = cm.from_pretrained(model_b, dtype=jnp.float32)
    pub = Publisher(fleet, tmp_path / "publish", every_steps=1, keep=2, dtype=jnp.float32,
                    tokenizer_dir=str(model_a))
    errors, done, stop = [], [0], threading.Event()

    def traffic():
        while not stop.is_set():
            try:
                out = fleet.generate(input_ids=ids, sampling_params={"max_new_tokens": 4})
                assert out["meta_info"]["completion_tokens"] >= 1
                done[0] += 1
                time.sleep(0.02)
            except Exception as e:  # noqa: BLE001 - collected and asserted empty below
                errors.append(e)

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    try:
        for w in workers:
            w.start()
        while done[0] < 6:
            time.sleep(0.05)
        procs[2].send_signal(signal.SIGKILL)  # mid-run, with requests in flight
        procs[2].wait(10)
        n = done[0]
        while done[0] < n + 6:
            time.sleep(0.05)
        assert not fleet.stats()["per_server"][2]["up"]

        assert pub.maybe_publish(1, nnx.split(model, nnx.Param), config, policy_version=1)
        assert pub.wait(120)
        results = pub.stats()["last_update_results"]
        assert results[urls[0]]["success"] and results[urls[1]]["success"]
        assert not results[urls[2]]["success"]
        expected = token_logps(hf_model(tmp_path / "publish" / "v1"), ids, 1)
        for url in urls[:2]:
            version, lp = scored(url, ids)
            assert version == "1"
            np.testing.assert_allclose(lp, expected, atol=TOL)
        n = done[0]
        while done[0] < n + 6:  # the survivors keep serving
            time.sleep(0.05)

        # back, with the OLD weights
        procs[2] = start_subprocess_server(model_a, ports[2], compile_cache=cache)
        deadline = time.monotonic() + 60
        while not fleet.stats()["per_server"][2]["up"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert fleet.stats()["per_server"][2]["up"]
        version, lp = scored(urls[2], ids)
        assert version == "1"
        np.testing.assert_allclose(lp, expected, atol=TOL)
    finally:
        stop.set()
        for w in workers:
            w.join(60)
        pub.close()
        fleet.close()
        for p in procs:
            if p is not None:
                p.kill()
                p.wait(10)
    assert errors == []
