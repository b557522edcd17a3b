"""`clawjax.config.validate`: every bad value is a `ConfigError` naming its key (never a bare
KeyError from a lookup), including combinations that would hang a run and the secret files
(`publish.api_key_file`, `buffer.token_file`)."""

from __future__ import annotations

import pytest

from clawjax import config as config_lib
from clawjax.config import ConfigError
from clawjax.configs import default, tiny_cpu


def tiny(**overrides):
    c = tiny_cpu.get_config()
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        (c[section] if section else c)[name] = value
    return c


def refused(config) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        config_lib.validate(config)
    return e.value


@pytest.mark.parametrize("make", [tiny_cpu.get_config, default.get_config])
def test_an_unknown_method_is_a_config_error(make):
    c = make()
    c.method = "foo"
    e = refused(c)
    assert e.key == "method" and "'foo'" in str(e) and "'combine'" in str(e)


def test_replay_with_max_staleness_is_refused():
    e = refused(tiny(**{"replay": "samples.jsonl", "trainer.max_staleness": 1}))
    assert e.key == "trainer.max_staleness"
    assert "replay = 'samples.jsonl'" in str(e) and "recorded with" in str(e)
    config_lib.validate(tiny(**{"replay": "samples.jsonl", "trainer.max_staleness": -1}))
    config_lib.validate(tiny(**{"buffer.address": "h:1", "trainer.max_staleness": 2}))


def test_publish_api_key_file_defaults_to_no_key():
    assert tiny_cpu.get_config().publish.api_key_file == ""
    config_lib.validate(tiny())


@pytest.mark.parametrize("key", ["publish.api_key_file", "buffer.token_file"])
def test_a_secret_file_must_hold_a_secret(tmp_path, key):
    missing = tmp_path / "missing.key"
    e = refused(tiny(**{key: str(missing)}))
    assert e.key == key and str(missing) in str(e)
    assert "No such file" in str(e)
    empty = tmp_path / "empty.key"
    empty.write_text(" \n")
    e = refused(tiny(**{key: str(empty)}))
    assert e.key == key and "not an empty one" in str(e)
    secret = tmp_path / "fleet.key"
    secret.write_text("secret\n")
    config_lib.validate(tiny(**{key: str(secret)}))


@pytest.mark.parametrize("key,value,expected", [
    ("warmstart.steps", 0, "an integer ≥ 1"),
    ("warmstart.batch_size", 0, "an integer ≥ 1"),
    ("warmstart.examples", 10, "warmstart.batch_size = 24"),
    ("warmstart.rows", 0, "an integer ≥ 1"),
    ("warmstart.token_budget", 1, "an integer ≥ 2"),
    ("warmstart.lr", 0.0, "a positive learning rate"),
    ("warmstart.lr", float("nan"), "a positive learning rate"),
    ("warmstart.hidden_size", 0, "an integer ≥ 1"),
    ("warmstart.hidden_size", 12, "head_dim"),
    ("warmstart.intermediate_size", 0, "an integer ≥ 1"),
    ("warmstart.num_layers", 0, "an integer ≥ 1"),
    ("warmstart.num_heads", 0, "an integer ≥ 1"),
    ("warmstart.num_kv_heads", 3, "a divisor of warmstart.num_heads = 4"),
    ("warmstart.explain_share", 1.5, "a share in [0, 1]"),
    ("warmstart.hinted_share", -0.1, "a share in [0, 1]"),
    ("warmstart.heldout_share", 1.0, "a share in [0, 1)"),
    ("warmstart.heldout_share", 0.999, "training tasks"),
    ("warmstart.seed", -1, "an integer ≥ 0"),
])
def test_warmstart_values_the_warm_start_would_fail_on_are_refused(key, value, expected):
    """`validate` checks every `warmstart.*` key `clawjax.warmstart` reads (the local run's
    warm start came after the earlier run was moved aside, and failed there with a traceback:
    optax's schedule, numpy's sample of more examples than there are)."""
    c = default.get_config()
    section, _, name = key.rpartition(".")
    c[section][name] = value
    e = refused(c)
    assert e.key == key and expected in str(e), str(e)


def test_the_warmstart_defaults_and_a_tiny_warm_start_pass():
    config_lib.validate(default.get_config())
    c = default.get_config()
    c.warmstart.steps, c.warmstart.examples = 1, 24   # the tests' tiny warm start
    config_lib.validate(c)


@pytest.mark.parametrize("key,value,expected", [
    ("trainer.take_timeout_s", 0.0, "a positive number of seconds"),
    ("trainer.take_timeout_s", -1.0, "a positive number of seconds"),
    ("trainer.take_timeout_s", float("nan"), "a positive number of seconds"),
    ("buffer.keepalive_s", 0.0, "a positive number of seconds"),
    ("buffer.keepalive_s", 30.0, "less than rollout.lease_timeout_s = 30.0 in a local run"),
    ("rollout.lease_timeout_s", 0.0, "a positive number of seconds"),
    ("trainer.max_consecutive_skips", -1, "an integer ≥ 0"),
])
def test_waits_and_periods_that_would_spin_are_refused(key, value, expected):
    """A 0 s take timeout or keep-alive period was accepted: each wait returned at once and was
    asked again at once (641,295 takes from a queue, 4,627 Lease calls to the buffer in 3 s)."""
    c = default.get_config()
    section, _, name = key.rpartition(".")
    c[section][name] = value
    e = refused(c)
    assert e.key == key and expected in str(e), str(e)


@pytest.mark.parametrize("value", [0, -3])
def test_eval_every_steps_must_be_a_positive_integer(value):
    """0 or less made the evaluator re-score the version it had just scored every 0.5 s."""
    c = default.get_config()
    c.eval.every_steps = value
    e = refused(c)
    assert e.key == "eval.every_steps" and "an integer ≥ 1" in str(e)


def test_a_huge_eval_every_steps_is_no_periodic_eval():
    """What `clawjax.bench.async_loops` passes for "no periodic evaluation"."""
    from clawjax.bench.async_loops import NO_PERIODIC_EVAL

    c = default.get_config()
    c.eval.every_steps = int(NO_PERIODIC_EVAL.partition("=")[2])
    config_lib.validate(c)


def test_publish_keep_below_one_is_refused():
    """Found before any side effect, not in `publisher_from_config` after the workdir was made."""
    e = refused(tiny(**{"publish.every_steps": 1, "publish.keep": 0}))
    assert e.key == "publish.keep" and "an integer ≥ 1" in str(e)
