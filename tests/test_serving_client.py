"""The async client and teacher_logprobs against the embedded server, and the Fleet's routing,
retries and health probing against small scripted HTTP servers (real aiohttp on loopback)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from clawjax.serving.client import BadRequest, RequestTimedOut, SGLangClient, ServerUnavailable
from clawjax.serving.fleet import Fleet, FleetUnavailable
from clawjax.serving.launch import free_port
from clawjax.serving.teacher import (TeacherLogprobError, parse_teacher_response,
                                     teacher_request)
from test_serving_helpers import (Scripted, hf_a, hf_logp, model_a, server,  # noqa: F401
                                  tokenizer)

TOL = 1e-4


def run(coro):
    return asyncio.run(coro)


def test_client_endpoints(server, tokenizer):
    async def main():
        async with SGLangClient(server.url, timeout=60) as c:
            assert await c.health() and await c.health_generate()
            out = await c.generate(input_ids=tokenizer.encode("hi"), return_logprob=True,
                                   sampling_params={"max_new_tokens": 3, "temperature": 0,
                                                    "ignore_eos": True})
            assert len(out["output_ids"]) == 3 and len(out["meta_info"]["output_token_logprobs"]) == 3
            out = await c.generate(text="hello", sampling_params={"max_new_tokens": 2})
            assert out["meta_info"]["prompt_tokens"] == len(tokenizer.encode("hello"))
            chat = await c.chat_completions({"messages": [{"role": "user", "content": "x"}],
                                             "max_tokens": 2})
            assert chat["object"] == "chat.completion"
            events = [e async for e in c.generate_stream(
                {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}})]
            assert len(events) == 3 and events[-1]["meta_info"]["finish_reason"]
            assert (await c.get_model_info())["weight_version"] == "default"
            assert await c.get_weight_version() == "default"
            await c.flush_cache()
            await c.pause_generation("in_place")
            await c.continue_generation()
            with pytest.raises(BadRequest) as e:
                await c.generate(input_ids=[1], sampling_params={"max_new_tokens": -3})
            assert e.value.param == "sampling_params.max_new_tokens" and e.value.status == 400
            with pytest.raises(BadRequest):
                await c.update_weights_from_disk("/nonexistent/dir", "9")
    run(main())


def test_teacher_logprobs_match_hf(server, hf_a, tokenizer):
    prompt = tokenizer.encode("<|im_start|>user\nadd 2+2<|im_end|>\n<|im_start|>assistant\n")
    response = tokenizer.encode("four")

    async def main():
        async with SGLangClient(server.url) as c:
            return await c.teacher_logprobs(prompt, response, top_k=4)
    t = run(main())
    ids = prompt + response
    lp = hf_logp(hf_a, ids)
    p = len(prompt)
    ref = [lp[p + i - 1, tok] for i, tok in enumerate(response)]
    assert t.logp.shape == (len(response),) and t.logp.dtype == np.float32
    np.testing.assert_allclose(t.logp, ref, atol=TOL)
    assert t.topk_logp.shape == (len(response), 4) and t.topk_ids.shape == (len(response), 4)
    for i in range(len(response)):
        row = lp[p + i - 1]
        np.testing.assert_allclose(t.topk_logp[i], np.sort(row)[::-1][:4], atol=TOL)
        np.testing.assert_allclose(row[t.topk_ids[i]], t.topk_logp[i], atol=TOL)
    assert t.weight_version == "default"


def test_teacher_rejects_incomplete_or_misaligned_answers(server, tokenizer):
    prompt, response = tokenizer.encode("abc"), tokenizer.encode("def")

    async def main():
        async with SGLangClient(server.url) as c:
            return await c.generate_raw(teacher_request(prompt, response, top_k=2))
    good = run(main())
    parse_teacher_response(good, prompt, response, top_k=2)  # the real answer is accepted
    meta = good["meta_info"]

    def bad(**changes):
        return {**good, "meta_info": {**meta, **changes}}

    cases = {
        "short": bad(input_token_logprobs=meta["input_token_logprobs"][:-1]),
        "start at P (first response token lost)": bad(
            input_token_logprobs=meta["input_token_logprobs"][1:]),
        "misaligned": bad(input_token_logprobs=[meta["input_token_logprobs"][0]] + [
            [e[0], e[1] + 1, None] for e in meta["input_token_logprobs"][1:]]),
        "missing value": bad(input_token_logprobs=meta["input_token_logprobs"][:2] + [
            [None, response[-1], None]]),
        "nan": bad(input_token_logprobs=meta["input_token_logprobs"][:2] + [
            [float("nan"), response[-1], None]]),
        "top-k narrow": bad(input_top_logprobs=[None] + [
            t[:1] for t in meta["input_top_logprobs"][1:]]),
        "no logprobs": {"text": "", "output_ids": [], "meta_info": {"id": "x"}},
    }
    for name, answer in cases.items():
        with pytest.raises(TeacherLogprobError):
            parse_teacher_response(answer, prompt, response, top_k=2)
            pytest.fail(name)
    with pytest.raises(ValueError, match="prompt_ids"):
        teacher_request([], response)
    with pytest.raises(ValueError, match="response_ids"):
        teacher_request(prompt, [])


def test_teacher_parse_refuses_every_malformed_shape_with_its_own_error():
    """Whatever shape a server answers, parsing raises TeacherLogprobError naming the entry
    (never a KeyError / TypeError / IndexError that the caller does not expect)."""
    prompt, response = [1, 2, 3], [7, 8]
    good_entries = [[None, 3, None], [-0.2, 7, None], [-0.3, 8, None]]
    good_tops = [None, [[-0.2, 7, None], [-1.0, 5, None]], [[-0.3, 8, None], [-2.0, 9, None]]]

    def answer(entries=good_entries, tops=good_tops):
        return {"meta_info": {"input_token_logprobs": entries, "input_top_logprobs": tops}}

    out = parse_teacher_response(answer(), prompt, response, top_k=2)
    np.testing.assert_allclose(out.logp, [-0.2, -0.3])
    assert out.topk_ids.tolist() == [[7, 5], [8, 9]]
    cases = {
        "first entry an object": (answer([{"logprob": None, "id": 3}] + good_entries[1:]),
                                  r"input_token_logprobs\[0\]"),
        "first entry a number": (answer([3] + good_entries[1:]), r"input_token_logprobs\[0\]"),
        "entry an object": (answer(good_entries[:1] + [{"0": -0.2, "1": 7}, good_entries[2]]),
                            r"input_token_logprobs\[1\]"),
        "token id a string": (answer(good_entries[:2] + [[-0.3, "8", None]]),
                              r"input_token_logprobs\[2\]"),
        "top-K entries null": (answer(tops=[None, [None, None], [None, None]]),
                               r"input_top_logprobs\[1\]\[0\]"),
        "top-K entry short": (answer(tops=[None, [[-0.2], [-1.0, 5]], good_tops[2]]),
                              r"input_top_logprobs\[1\]\[0\]"),
        "top-K id null": (answer(tops=[None, good_tops[1], [[-0.3, None], [-2.0, 9]]]),
                          r"input_top_logprobs\[2\]\[0\]"),
        "top-K id negative": (answer(tops=[None, good_tops[1], [[-0.3, 8], [-2.0, -1]]]),
                              r"input_top_logprobs\[2\]\[1\]"),
        "top-K logprob a string": (answer(tops=[None, [["x", 7], [-1.0, 5]], good_tops[2]]),
                                   r"input_top_logprobs\[1\]\[0\]"),
        "top-K row an object": (answer(tops=[None, {"a": 1, "b": 2}, good_tops[2]]),
                                r"input_top_logprobs\[1\]"),
        "entries not a list": ({"meta_info": {"input_token_logprobs": {"0": 1}}},
                               "input_token_logprobs"),
        "answer a list": ([1, "a", None], "meta_info"),
    }
    for name, (bad, where) in cases.items():
        with pytest.raises(TeacherLogprobError, match=where):
            parse_teacher_response(bad, prompt, response, top_k=2)
            pytest.fail(f"{name}: accepted")


# --- the fleet against scripted servers -------------------------------------------------------

def test_fleet_routes_to_the_least_loaded_server():
    async def main():
        a, b = await Scripted("a", delay=0.3).start(), await Scripted("b", delay=0.3).start()
        async with Fleet([a.url, b.url], probe_interval=10) as fleet:
            outs = await asyncio.gather(*(fleet.generate(input_ids=[1]) for _ in range(6)))
            assert a.generated == 3 and b.generated == 3  # in-flight counts balance
            b.delay = 0.0  # b now finishes at once, a stays busy: b takes the new work
            busy = [asyncio.create_task(fleet.generate(input_ids=[1])) for _ in range(2)]
            await asyncio.sleep(0.05)
            for _ in range(4):
                assert (await fleet.generate(input_ids=[1]))["text"] == "b"
            await asyncio.gather(*busy)
        await a.stop(), await b.stop()
        return outs
    assert len(run(main())) == 6


def test_fleet_retries_elsewhere_marks_down_and_brings_back():
    async def main():
        a, b = await Scripted("a").start(), await Scripted("b").start()
        dead_port = free_port()
        fleet = await Fleet([a.url, b.url, f"http://127.0.0.1:{dead_port}"], backoff=0.01,
                            probe_interval=0.1, timeout=5).start()
        try:
            for _ in range(6):
                assert (await fleet.generate(input_ids=[1]))["text"] in ("a", "b")
            dead = fleet.servers[2]
            assert not dead.up and dead.failures >= 1
            # a 5xx marks the server down and the request goes to another one
            a.status = 503
            outs = [await fleet.generate(input_ids=[1]) for _ in range(3)]
            assert all(o["text"] == "b" for o in outs) and not fleet.servers[0].up
            a.status = 200
            # a 4xx is the caller's fault: raised at once, nobody is marked down
            b.status = 400
            with pytest.raises(BadRequest):
                await fleet.generate(input_ids=[1])
            assert fleet.servers[1].up
            b.status = 200
            # the weights move on while the dead server is away
            res = await fleet.update_weights_from_disk("/ckpt/v3", "3")
            assert res[b.url]["success"] and not res[dead.url]["success"]
            # it comes back on the same port: the prober updates it first, then marks it up
            back = await Scripted("c", port=dead_port).start()
            deadline = time.monotonic() + 10
            while not (dead.up and fleet.servers[0].up) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert dead.up and back.updates == [("/ckpt/v3", "3")]
            assert fleet.servers[0].up and a.updates == [("/ckpt/v3", "3")]
            stats = fleet.stats()
            assert stats["up"] == 3 and stats["target_weight_version"] == "3"
            await back.stop()
        finally:
            await fleet.aclose()
            await a.stop(), await b.stop()
    run(main())


def test_fleet_updates_a_server_restarted_on_its_launch_weights():
    """A server that held the target version dies and comes back on its launch weights: the
    prober asks it what it holds and brings it to the target before routing to it again."""
    async def main():
        a = await Scripted("a").start()
        async with Fleet([a.url], probe_interval=0.05, backoff=0.01) as fleet:
            await fleet.update_weights_from_disk("/ckpt/v2", "2")
            assert a.version == "2" and fleet.servers[0].weight_version == "2"
            await a.stop()
            deadline = time.monotonic() + 10
            while fleet.servers[0].up and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert not fleet.servers[0].up
            restarted = await Scripted("a2", port=a.port).start()   # version "default"
            while not fleet.servers[0].up and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert restarted.updates == [("/ckpt/v2", "2")]
            out = await fleet.generate(input_ids=[1])
            assert out["meta_info"]["weight_version"] == "2"
            assert not fleet.stats()["per_server"][0]["stale"]
            await restarted.stop()
    run(main())


def test_fleet_with_nothing_up_fails_in_bounded_time():
    async def main():
        fleet = await Fleet([f"http://127.0.0.1:{free_port()}"], max_attempts=3, backoff=0.01,
                            backoff_max=0.05, probe_interval=0.05, timeout=2).start()
        t0 = time.monotonic()
        with pytest.raises(FleetUnavailable):
            await fleet.generate(input_ids=[1])
        await fleet.aclose()
        return time.monotonic() - t0
    assert run(main()) < 30  # bounded, never hangs (generous: not a timing assertion)


def test_client_timeout_raises_server_unavailable():
    async def main():
        slow = await Scripted("slow", delay=1.0).start()
        async with SGLangClient(slow.url, timeout=0.3) as c:
            with pytest.raises(RequestTimedOut, match="timed out") as raised:
                await c.generate(input_ids=[1])
            assert isinstance(raised.value, ServerUnavailable)
        await slow.stop()
    run(main())


def test_fleet_timeout_on_a_healthy_server_is_the_callers_and_a_hung_one_is_retried():
    """A generation longer than the deadline on a server that still answers /health: the
    caller gets RequestTimedOut at once, the server stays up (no reload of its weights when
    it "returns") and no other server runs it again. A server whose /health hangs too is
    marked down and the request goes elsewhere."""
    async def main():
        slow, other = await Scripted("slow").start(), await Scripted("other").start()
        async with Fleet([slow.url, other.url], probe_interval=30.0, timeout=0.3,
                         health_timeout=0.3, backoff=0.01) as fleet:
            await fleet.update_weights_from_disk("/ckpt/v2", "2")
            slow.delay = 1.0
            fleet.servers[1].in_flight = 1  # route the next request to `slow`
            with pytest.raises(RequestTimedOut, match="timed out"):
                await fleet.generate(input_ids=[1])
            fleet.servers[1].in_flight = 0
            per = fleet.stats()["per_server"]
            assert per[0]["up"] and per[0]["timeouts"] == 1 and per[0]["failures"] == 0
            assert other.generated == 0 and slow.updates == [("/ckpt/v2", "2")]
            # hung: neither the generation nor /health answers in time
            slow.health_delay = 1.0
            fleet.servers[1].in_flight = 1
            out = await fleet.generate(input_ids=[1])
            assert out["text"] == "other"
            per = fleet.stats()["per_server"]
            assert not per[0]["up"] and per[0]["failures"] == 1 and per[0]["timeouts"] == 1
            assert "did not answer" in per[0]["last_error"]
        await asyncio.sleep(1.0)  # let the slow handlers finish before their server stops
        await slow.stop(), await other.stop()
    run(main())


def test_fleet_server_refusing_an_update_stays_up_and_is_retried():
    async def main():
        a, b = await Scripted("a").start(), await Scripted("b").start()
        b.update_status = 400  # b cannot load the checkpoint (yet)
        async with Fleet([a.url, b.url], probe_interval=0.05, update_retry_interval=0.1) as fleet:
            res = await fleet.update_weights_from_disk("/ckpt/v2", "2")
            assert res[a.url]["success"] and not res[b.url]["success"]
            per = fleet.stats()["per_server"]
            assert per[1]["up"] and per[1]["stale"] and not per[0]["stale"]
            outs = {(await fleet.generate(input_ids=[1]))["text"] for _ in range(4)}
            assert outs == {"a", "b"}  # b keeps serving (its answers carry its old version)
            b.update_status = 200
            deadline = time.monotonic() + 10
            while fleet.stats()["per_server"][1]["stale"] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert b.updates == [("/ckpt/v2", "2")] and b.version == "2"
            assert fleet.stats()["per_server"][1]["up"]
        await a.stop(), await b.stop()
    run(main())


def test_fleet_keeps_a_server_up_through_a_tiny_temperature_request(server, tokenizer):
    """A temperature below SGLang's sampling eps (1e-6) is greedy: the request succeeds and
    the (healthy) server is not marked down."""
    ids = tokenizer.encode("tiny")

    async def main():
        async with Fleet([server.url], probe_interval=30.0, max_attempts=2) as fleet:
            greedy = await fleet.generate_raw({"input_ids": ids, "sampling_params": {
                "max_new_tokens": 4, "temperature": 0}})
            tiny = await fleet.generate_raw({"input_ids": ids, "sampling_params": {
                "max_new_tokens": 4, "temperature": 1e-310}})
            assert tiny["output_ids"] == greedy["output_ids"]
            s = fleet.servers[0]
            assert s.up and s.failures == 0
    run(main())


class CountingScripted(Scripted):
    """A scripted server that counts `/update_weights_from_disk` calls when they arrive."""
    arrived = 0

    async def _update(self, request):
        self.arrived += 1
        return await super()._update(request)


def test_fleet_does_not_resend_an_update_still_in_flight():
    """An update that takes longer than update_retry_interval is not re-sent by the prober
    while it runs; once it ends (here refused) the normal retry applies, once."""
    async def main():
        a = await CountingScripted("a").start()
        a.update_delay, a.update_status = 0.6, 400
        async with Fleet([a.url], probe_interval=0.02, update_retry_interval=0.05) as fleet:
            res = await fleet.update_weights_from_disk("/ckpt/v2", "2")
            assert not res[a.url]["success"] and a.arrived == 1
            a.update_status = 200  # the checkpoint can be loaded now: the retry succeeds
            deadline = time.monotonic() + 10
            while fleet.stats()["per_server"][0]["stale"] and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert not fleet.stats()["per_server"][0]["stale"]
            assert a.arrived == 2 and a.updates == [("/ckpt/v2", "2")]
            await asyncio.sleep(0.2)  # the fleet is current: nothing more is sent
            assert a.arrived == 2
        await a.stop()
    run(main())


def test_fleet_does_not_reload_an_unversioned_update_forever():
    """An update without a weight_version that a server took is not re-sent by the prober
    every update_retry_interval (each resend reloads the whole checkpoint); a server that
    restarts (back on its launch weights) still gets it again."""
    async def main():
        a = await CountingScripted("a").start()
        async with Fleet([a.url], probe_interval=0.02, update_retry_interval=0.05,
                         backoff=0.01) as fleet:
            res = await fleet.update_weights_from_disk("/ckpt/v3")
            assert res[a.url]["success"] and a.arrived == 1
            await asyncio.sleep(0.5)  # ten retry intervals: the server holds the target
            assert a.arrived == 1 and not fleet.stats()["per_server"][0]["stale"]
            await a.stop()
            deadline = time.monotonic() + 10
            while fleet.servers[0].up and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert not fleet.servers[0].up
            restarted = await CountingScripted("a2", port=a.port).start()
            while not fleet.servers[0].up and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert fleet.servers[0].up and restarted.updates == [("/ckpt/v3", None)]
            await asyncio.sleep(0.3)
            assert restarted.arrived == 1
            await restarted.stop()
    run(main())


def test_fleet_brings_a_returning_server_to_an_update_made_while_it_recovered():
    """A server comes back and the prober starts bringing it to the target (v2); while that
    load runs the fleet is asked for v3 (the server is still down, so it is not sent then).
    The server must be brought to v3 too before it is marked up, not routed to on v2."""
    async def main():
        a = await CountingScripted("a").start()
        async with Fleet([a.url], probe_interval=0.02, update_retry_interval=30.0,
                         backoff=0.01) as fleet:
            await fleet.update_weights_from_disk("/ckpt/v2", "2")
            await a.stop()
            deadline = time.monotonic() + 10
            while fleet.servers[0].up and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert not fleet.servers[0].up
            back = await CountingScripted("a2", port=a.port).start()
            back.update_delay = 2.0  # a slow checkpoint load
            while back.arrived == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            res = await fleet.update_weights_from_disk("/ckpt/v3", "3")
            assert not res[back.url]["success"]  # down (recovering): updated when it returns
            while not fleet.servers[0].up and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert fleet.servers[0].up
            assert back.version == "3" and fleet.servers[0].weight_version == "3"
            assert not fleet.stats()["per_server"][0]["stale"]
            assert back.updates == [("/ckpt/v2", "2"), ("/ckpt/v3", "3")]
            await back.stop()
    run(main())
