"""Publisher: HF export on a cadence pushed to embedded servers over HTTP, coalescing, keep-K,
and crash safety (SIGKILL mid-publish leaves only complete versions)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clawjax import model as cm
from clawjax.publish import Publisher, list_versions
from clawjax.serving.launch import ServerThread, make_context
from clawjax.serving.sync import SyncFleet
from test_serving_helpers import (REPO, Scripted, free_port, hf_model, model_a,  # noqa: F401
                                  model_b, token_logps, tokenizer)

TOL = 1e-4


def score(url: str, ids: list[int]) -> tuple[str, np.ndarray]:
    out = httpx.post(url + "/generate", timeout=60, json={
        "input_ids": ids, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
        "logprob_start_len": 0}).json()
    return (out["meta_info"]["weight_version"],
            np.array([e[0] for e in out["meta_info"]["input_token_logprobs"][1:]]))


def test_publish_every_n_steps_updates_every_server(tmp_path, model_a, model_b, tokenizer):
    servers = [ServerThread(make_context(str(model_a), max_batch=2, context_len=128)).start()
               for _ in range(2)]
    model, config = cm.from_pretrained(model_b, dtype=jnp.float32)
    graphdef, params = nnx.split(model, nnx.Param)
    pub = Publisher([s.url for s in servers], tmp_path / "publish", every_steps=2, keep=2,
                    tokenizer_dir=str(model_a), fleet_kwargs={"probe_interval": 0.2})
    ids = tokenizer.encode("Publish me, please.")
    try:
        for step in range(1, 7):
            # the "optimizer step": a new parameter value every step
            params = jax.tree.map(lambda x: x * 1.01, params)
            scheduled = pub.maybe_publish(step, (graphdef, params), config, policy_version=step)
            assert scheduled == (step % 2 == 0)
            if step in (2, 4):
                assert pub.wait(120)
                # donating / overwriting the trainer's buffers must not affect the snapshot
        assert pub.wait(120)
        stats = pub.stats()
        assert stats["published"] + stats["coalesced"] == 3 and stats["failed"] == 0
        assert stats["last_version"] == 6 and stats["server_update_failures"] == 0
        assert list_versions(tmp_path / "publish") == [4, 6]  # keep = 2
        v6 = tmp_path / "publish" / "v6"
        files = set(os.listdir(v6))
        assert {"config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json"} <= files
        assert json.load(open(v6 / "config.json")).get("torch_dtype", "bfloat16") == "bfloat16" \
            or json.load(open(v6 / "config.json")).get("dtype") == "bfloat16"
        # the published weights are the trainer's step-6 parameters rounded to bfloat16
        loaded, _ = cm.from_pretrained(v6, dtype=jnp.float32)
        got = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
        for path, var in nnx.to_flat_state(params):
            want = np.asarray(var.get_value().astype(jnp.bfloat16).astype(jnp.float32))
            np.testing.assert_array_equal(np.asarray(got[path].get_value()), want)
        reference = hf_model(v6)  # transformers loads the published directory as is
        expected = token_logps(reference, ids, 1)
        for s in servers:
            version, lp = score(s.url, ids)
            assert version == "6"
            np.testing.assert_allclose(lp, expected, atol=TOL)
            assert httpx.get(s.url + "/get_model_info").json()["model_path"] == str(v6)
    finally:
        pub.close()
        for s in servers:
            s.stop()
    assert os.listdir(tmp_path / "publish" / ".staging") == []


def test_busy_publishes_are_coalesced_and_counted(tmp_path, model_a):
    model, config = cm.from_pretrained(model_a, dtype=jnp.float32)
    state = nnx.split(model, nnx.Param)
    port = free_port()
    fleet = SyncFleet([f"http://127.0.0.1:{port}"], probe_interval=0.2)
    slow = Scripted("slow", port=port)
    slow.update_delay = 1.0  # each publish waits a second on the server
    fleet.run(slow.start())
    pub = Publisher(fleet, tmp_path / "pub", every_steps=1, keep=5)
    try:
        assert pub.maybe_publish(1, state, config, policy_version=1)
        deadline = time.monotonic() + 60
        while not pub.stats()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.01)
        for v in (2, 3, 4, 5):  # due while v1 is still being pushed
            assert pub.maybe_publish(v, state, config, policy_version=v)
        assert pub.wait(60)
        stats = pub.stats()
        assert stats["coalesced"] == 3 and stats["published"] == 2
        assert list_versions(tmp_path / "pub") == [1, 5]
        assert [v for _, v in slow.updates] == ["1", "5"]
        assert stats["last_update_results"] == {slow.url: {"success": True, "message": "ok"}}
    finally:
        pub.close()
        fleet.run(slow.stop())
        fleet.close()


_CRASH_SCRIPT = textwrap.dedent("""
    import sys, jax.numpy as jnp
    from clawjax import model as cm
    from clawjax.publish import Publisher
    config = cm.ModelConfig.from_hf(dict(
        model_type="qwen3", vocab_size=512, hidden_size=256, intermediate_size=768,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=256, tie_word_embeddings=False))
    model = cm.init_random(config, seed=0)
    pub = Publisher(None, sys.argv[1], every_steps=1, keep=3)
    for v in range(1, 100000):
        pub.maybe_publish(v, model, config, policy_version=v)
        pub.wait()
        print(v, flush=True)
""")


def _is_complete(path) -> bool:
    try:
        m, config = cm.from_pretrained(path, dtype=jnp.float32)
    except Exception:  # noqa: BLE001 - any failure means incomplete
        return False
    return config.hidden_size == 256


def test_sigkill_mid_publish_leaves_only_complete_versions(tmp_path):
    out = tmp_path / "pub"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.Popen([sys.executable, "-c", _CRASH_SCRIPT, str(out)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        seen = 0
        while seen < 3:  # several publishes done, the next is being written right now
            line = proc.stdout.readline()
            assert line, "publisher subprocess died"
            seen = int(line)
        time.sleep(0.013)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    versions = list_versions(out)
    assert versions and len(versions) <= 4
    names = [n for n in os.listdir(out) if not n.startswith(".")]
    assert sorted(names) == sorted(f"v{v}" for v in versions)  # nothing half-named
    for v in versions:
        assert _is_complete(out / f"v{v}"), f"v{v} is incomplete"
    # a new publisher on the same directory clears the staging leftovers, keeps the versions
    Publisher(None, out, every_steps=1).close()
    assert os.listdir(out / ".staging") == [] and list_versions(out) == versions


def test_a_crash_while_pruning_leaves_no_half_deleted_version(tmp_path, monkeypatch):
    """Removing an old version is interrupted after its weights are gone (a crash inside
    rmtree): no `v<N>` directory under publish_dir may be left incomplete; the remains sit in
    the staging area, which the next publisher clears."""
    import clawjax.publish as publish_mod

    config = cm.ModelConfig.from_hf(dict(
        model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=128,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        max_position_embeddings=64, tie_word_embeddings=False))
    model = cm.init_random(config, seed=0)
    out = tmp_path / "pub"
    pub = Publisher(None, out, every_steps=1, keep=1)
    pub.maybe_publish(1, model, config, policy_version=1)
    assert pub.wait(60) and list_versions(out) == [1]

    def crashing_rmtree(path, ignore_errors=False):
        os.unlink(os.path.join(path, "model.safetensors"))
        raise OSError(f"simulated crash while removing {path}")

    monkeypatch.setattr(publish_mod.shutil, "rmtree", crashing_rmtree)
    pub.maybe_publish(2, model, config, policy_version=2)
    assert pub.wait(60)
    monkeypatch.undo()
    assert pub.stats()["failed"] == 1
    pub.close()
    assert list_versions(out) == [2]
    assert cm.from_pretrained(out / "v2", dtype=jnp.float32)[1] == config  # v2 is whole
    Publisher(None, out, every_steps=1).close()
    assert os.listdir(out / ".staging") == [] and list_versions(out) == [2]


def tiny_model():
    """A one-layer random Qwen3 (vocabulary 128) and its config: quick to export."""
    config = cm.ModelConfig.from_hf(dict(
        model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=128,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        max_position_embeddings=64, tie_word_embeddings=False))
    return cm.init_random(config, seed=0), config


def _publish_all(pub, model, config, versions) -> list[list[int]]:
    """Publishes `versions` one at a time; the versions on disk after each."""
    seen = []
    for v in versions:
        assert pub.maybe_publish(v, model, config, policy_version=v, force=True)
        assert pub.wait(60)
        assert pub.stats()["last_version"] == v, pub.stats()["last_error"]
        seen.append(list_versions(pub.publish_dir))
    return seen


def test_a_resumed_run_prunes_in_publish_order_not_by_number(tmp_path):
    """The version is the step: a run resumed from its step-10 checkpoint publishes v10, v12
    while the crashed run left v14, v16. Pruning by number deleted the version just published
    (the fleet's target) and kept the dead run's; by publish order the dead run's go first."""
    model, config = tiny_model()
    out = tmp_path / "pub"
    crashed = Publisher(None, out, every_steps=2, keep=2)
    _publish_all(crashed, model, config, range(2, 18, 2))
    crashed.close()
    assert list_versions(out) == [14, 16]
    resumed = Publisher(None, out, every_steps=2, keep=2)
    try:
        assert _publish_all(resumed, model, config, [10, 12, 14]) == [
            [10, 16], [10, 12], [12, 14]]
        assert _is_complete_tiny(out / "v14", config)
    finally:
        resumed.close()


def test_a_new_run_keeps_its_versions_over_a_dead_runs(tmp_path):
    """A run that died before its first checkpoint left v6, v8: a new run's v2, v4 stay."""
    model, config = tiny_model()
    out = tmp_path / "pub"
    dead = Publisher(None, out, every_steps=2, keep=2)
    _publish_all(dead, model, config, [2, 4, 6, 8])
    dead.close()
    new = Publisher(None, out, every_steps=2, keep=2)
    try:
        assert _publish_all(new, model, config, [2, 4, 6]) == [[2, 8], [2, 4], [4, 6]]
    finally:
        new.close()


def _is_complete_tiny(path, config) -> bool:
    return cm.from_pretrained(path, dtype=jnp.float32)[1] == config


def test_a_failed_write_removes_its_staging_directory(tmp_path, monkeypatch):
    """A write that fails after its bytes hit the disk (ENOSPC) leaves nothing in `.staging`
    and no version; the failure is counted and the next publish works."""
    import errno

    import clawjax.publish_snapshot as publish_snapshot

    model, config = tiny_model()
    out = tmp_path / "pub"
    pub = Publisher(None, out, every_steps=1, keep=2)
    real_write = publish_snapshot.write

    def failing_write(snapshot, graphdef, config, path, dtype):
        real_write(snapshot, graphdef, config, path, dtype)
        assert os.listdir(path)  # the partial version is in staging ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... when the write fails

    try:
        monkeypatch.setattr(publish_snapshot, "write", failing_write)
        for v in (1, 2):
            pub.maybe_publish(v, model, config, policy_version=v)
            assert pub.wait(60)
        assert pub.stats()["failed"] == 2 and "No space left" in pub.stats()["last_error"]
        assert os.listdir(out / ".staging") == [] and list_versions(out) == []
        def half_written(staging):
            (staging / "model.safetensors").write_bytes(b"partial")
            raise ValueError("bad tensor")

        with pytest.raises(ValueError, match="bad tensor"):  # write_version called directly
            pub.write_version(half_written, 3)
        assert os.listdir(out / ".staging") == [] and list_versions(out) == []
        monkeypatch.undo()
        assert _publish_all(pub, model, config, [4]) == [[4]]
        assert os.listdir(out / ".staging") == []
    finally:
        pub.close()


def test_a_coalesced_publish_calls_its_on_drop_not_its_check(tmp_path):
    """Every scheduled publish gets exactly one of `check` (it reached the publisher thread)
    and `on_drop` (replaced by a newer one while waiting, or discarded by close(wait=False))."""
    model, config = tiny_model()
    pub = Publisher(None, tmp_path / "pub", every_steps=1, keep=3)
    release, checked, dropped = threading.Event(), [], []

    def check_of(v):
        def check():
            checked.append(v)
            return release.wait(60)
        return check

    def schedule(v):
        assert pub.maybe_publish(v, model, config, policy_version=v, check=check_of(v),
                                 on_drop=lambda: dropped.append(v))

    try:
        schedule(1)
        deadline = time.monotonic() + 60
        while not checked and time.monotonic() < deadline:  # v1 is being checked
            time.sleep(0.01)
        schedule(2)
        schedule(3)  # replaces v2, which was waiting
        assert dropped == [2]
        release.set()
        assert pub.wait(60)
        assert checked == [1, 3] and dropped == [2]
        assert pub.stats()["coalesced"] == 1 and list_versions(tmp_path / "pub") == [1, 3]
        release.clear()
        schedule(4)
        while checked[-1] != 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        schedule(5)  # pending when the publisher is closed without waiting
        threading.Timer(0.5, release.set).start()
    finally:
        pub.close(wait=False)
    assert checked == [1, 3, 4] and dropped == [2, 5]


def test_publisher_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        Publisher(None, tmp_path, every_steps=1, keep=0)


def test_publisher_from_config(tmp_path):
    import ml_collections

    from clawjax.publish import publisher_from_config
    cfg = ml_collections.ConfigDict({"every_steps": 0, "dir": "", "urls": "", "keep": 2,
                                     "dtype": "bfloat16"})
    assert publisher_from_config(cfg, tmp_path) is None
    cfg.every_steps = 3
    pub = publisher_from_config(cfg, tmp_path)
    try:
        assert pub.publish_dir == tmp_path / "publish" and pub.every_steps == 3
        assert pub.keep == 2 and pub.dtype == jnp.bfloat16 and pub._fleet is None
    finally:
        pub.close()
    cfg.dtype = "int8"
    with pytest.raises(ValueError, match="publish.dtype"):
        publisher_from_config(cfg, tmp_path)


def test_publisher_from_config_names_a_bad_keep(tmp_path):
    """`publish.keep` < 1 (the served version would be deleted) is refused naming the key, not
    a bare `keep` that reads like `checkpoint.keep`; `config.validate` checks it too (before any
    side effect), this is for a publish ConfigDict of the caller's own."""
    import ml_collections

    from clawjax.config import ConfigError
    from clawjax.publish import publisher_from_config
    cfg = ml_collections.ConfigDict({"every_steps": 3, "dir": "", "urls": "", "keep": 0,
                                     "dtype": "bfloat16"})
    with pytest.raises(ConfigError, match=r"'publish.keep' = 0, expected an integer ≥ 1"):
        publisher_from_config(cfg, tmp_path)
    assert not (tmp_path / "publish").exists()  # refused before anything is written


def test_bench_publish_runs_small(capsys):
    from clawjax.bench import publish as bench
    assert bench.main(["--hidden", "64", "--layers", "1", "--vocab", "256", "--repeats", "1",
                       "--clients", "2", "--updates", "1", "--seconds", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "ratio export / raw" in out and "longest wait during updates" in out


@pytest.mark.parametrize("with_key", [True, False])
def test_publish_api_key_file_is_sent_to_a_keyed_fleet(tmp_path, model_a, model_b, with_key):
    """`publish.api_key_file` (`publisher_from_config`): the fleet's updates carry the key, so
    a server started with one takes the published version; without it the server refuses the
    update (401) and the refusal is counted."""
    from ml_collections import ConfigDict

    from clawjax.publish import publisher_from_config

    server = ServerThread(make_context(str(model_a), max_batch=2, context_len=64,
                                       api_key="s3cret")).start()
    key_file = tmp_path / "fleet.key"
    key_file.write_text("s3cret\n")
    publish = ConfigDict(dict(every_steps=1, dir=str(tmp_path / "publish"), urls=server.url,
                              keep=2, dtype="float32",
                              api_key_file=str(key_file) if with_key else ""))
    model, config = cm.from_pretrained(model_b, dtype=jnp.float32)
    pub = publisher_from_config(publish, tmp_path)
    try:
        assert pub.maybe_publish(1, model, config, policy_version=1)
        assert pub.wait(120)
        stats = pub.stats()
        info = httpx.get(server.url + "/get_model_info",
                         headers={"Authorization": "Bearer s3cret"}).json()
        if with_key:
            assert stats["server_update_failures"] == 0, stats["last_update_results"]
            assert info["weight_version"] == "1"
        else:
            assert stats["server_update_failures"] == 1
            assert "401" in stats["last_update_results"][server.url]["message"]
            assert info["weight_version"] == "default"
    finally:
        pub.close()
        server.stop()


def test_an_unreadable_api_key_file_names_the_key(tmp_path):
    from ml_collections import ConfigDict

    from clawjax.config import ConfigError
    from clawjax.publish import publisher_from_config

    publish = ConfigDict(dict(every_steps=1, dir="", urls="", keep=2, dtype="float32",
                              api_key_file=str(tmp_path / "missing.key")))
    with pytest.raises(ConfigError, match=r"'publish\.api_key_file' = .*missing\.key"):
        publisher_from_config(publish, tmp_path)
