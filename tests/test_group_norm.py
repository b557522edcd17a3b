"""GRPO group normalisation of rewards (SPEC §2 option) against a NumPy float64 reference written
here, and its wiring into the trainer (`loss.group_norm`)."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from clawjax import config as config_lib
from clawjax import group_norm
from clawjax.loop import TrainLoop
from clawjax.sample import Sample
from clawjax.sources import QueueSource
from test_trainer import max_param_diff, params_of, tiny_config

TOL = 1e-5  # float32 arithmetic against float64


def sample(i, prompt, reward, kind="rl", group=None):
    meta = {"group_id": group} if group is not None else {}
    r = 3
    return Sample(f"s{i}", list(prompt) + [7, 8, 9], r, reward=reward, kind=kind,
                  rollout_logp=[-0.5] * r,
                  teacher_logp=[-0.1] * r if kind != "rl" else None, metadata=meta)


def reference(rewards, groups, scale):
    """GRPO advantages in float64: r − group mean, over the unbiased group std (+1e-6)."""
    members = collections.defaultdict(list)
    for r, g in zip(rewards, groups):
        members[g].append(r)
    out = []
    for r, g in zip(rewards, groups):
        values = np.asarray(members[g], np.float64)
        a = r - values.mean()
        if scale:
            std = values.std(ddof=1) if len(values) > 1 else 0.0
            a = a / (std + 1e-6)
        out.append(a)
    return out


@pytest.mark.parametrize("mode", ["mean", "mean_std"])
def test_rewards_are_normalised_per_prompt_group(mode):
    rng = np.random.default_rng(0)
    prompts = [[1, 2], [3, 4, 5], [6]]
    samples, groups = [], []
    for i in range(24):
        p = int(rng.integers(0, 3))
        samples.append(sample(i, prompts[p], float(rng.choice([-1.0, 0.0, 1.0]))))
        groups.append(p)
    samples.append(sample(99, [1, 2], 1.0, group="explicit"))  # its own group (of one) by id
    groups.append("explicit")
    samples.append(sample(100, [1, 2], 0.0, kind="opd"))      # no RL signal: untouched
    before = [s.reward for s in samples]
    out = group_norm.normalize_rewards(samples, mode)
    rl = [i for i, s in enumerate(samples) if s.kind != "opd"]
    want = reference([before[i] for i in rl], [groups[i] for i in rl], mode == "mean_std")
    np.testing.assert_allclose([out[i].reward for i in rl], want, rtol=TOL, atol=TOL)
    assert out[-2].reward == 0.0                                # a group of one
    assert out[-1] is samples[-1] and out[-1].reward == 0.0
    assert [s.reward for s in samples] == before                # inputs unchanged
    assert out[0].sample_id == samples[0].sample_id and out[0].tokens is samples[0].tokens


@pytest.mark.parametrize("rewards", [[-2.9, -2.9, -2.9], [0.6] * 6, [1.0, 1.001],
                                     [3.0, 3.0001], [100.0, 100.5, 100.25]])
def test_mean_std_is_exact_for_equal_and_nearby_rewards(rewards):
    """One prompt group: equal rewards give exactly 0 (float32 E[r²] − E[r]² gave 0.238 for
    [-2.9] * 3), nearby ones the float64 reference ([3.0, 3.0001] → ±0.697, not ±50).
    Rewards enter the normalisation as float32, so the reference sees them rounded the same."""
    samples = [sample(i, [1, 2], r) for i, r in enumerate(rewards)]
    out = group_norm.normalize_rewards(samples, "mean_std")
    as_f32 = [float(np.float32(r)) for r in rewards]
    want = reference(as_f32, [0] * len(rewards), True)
    np.testing.assert_allclose([s.reward for s in out], want, rtol=TOL, atol=TOL)
    if len(set(rewards)) == 1:
        assert [s.reward for s in out] == [0.0] * len(rewards)


def test_none_and_bad_modes():
    samples = [sample(0, [1], 1.0), sample(1, [1], -1.0)]
    assert group_norm.normalize_rewards(samples, "none") is samples
    with pytest.raises(ValueError, match="group_norm"):
        group_norm.normalize_rewards(samples, "z-score")
    assert config_lib.GROUP_NORM_MODES == group_norm.GROUP_NORM_MODES
    with pytest.raises(config_lib.ConfigError, match=r"loss\.group_norm"):
        config_lib.validate(tiny_config("unused", **{"loss.group_norm": "batch"}))


def test_the_trainer_trains_on_group_normalised_rewards(tmp_path):
    """A step with `loss.group_norm = mean_std` equals a step without it on samples whose
    rewards were normalised beforehand by the reference."""
    prompts = [[5, 6, 7], [8, 9]]
    rewards = [1.0, -1.0, 1.0, 1.0, -1.0, 0.0, 1.0, -1.0]
    samples = [sample(i, prompts[i % 2], r) for i, r in enumerate(rewards)]
    normalized = reference(rewards, [i % 2 for i in range(8)], True)
    pre = [Sample(s.sample_id, s.tokens, s.response_len, reward=float(a), kind=s.kind,
                  rollout_logp=s.rollout_logp)
           for s, a in zip(samples, normalized)]
    params = {}
    for name, batch, mode in (("grouped", samples, "mean_std"), ("pre", pre, "none")):
        source = QueueSource()
        source.put(batch)
        loop = TrainLoop(tiny_config(tmp_path / name, method="rl", **{
            "loss.group_norm": mode, "trainer.samples_per_step": 8, "loss.report_kl": False}),
            source=source)
        loop.train_step(loop.take_samples())
        params[name] = params_of(loop)
        loop.close()
    assert max_param_diff(params["grouped"], params["pre"]) <= 1e-6
