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
