"""Which samples the trainer trains: `admit` decides, for each sample a source delivered, whether
this step may train it or why not (`DROP_REASONS`). `TrainLoop.take_samples` counts each drop and
tells the source (`source.reject`: kept on disk, never trained).
"""

from __future__ import annotations

import logging

from clawjax.sample import Sample, SampleError, require_rollout_logp

log = logging.getLogger("clawjax.train")

# Why the trainer drops a sample it took; every count, zeros included, is in each step's
# metrics (`dropped_<reason>`) and in the run's summary (`trainer_<reason>`).
DROP_REASONS = ("invalid", "too_long", "stale")


def needs_rollout_logp(config) -> bool:
    """Whether the loss reads each sample's `rollout_logp`: as the old policy
    (loss.old_logp = 'rollout') or in the truncated importance weight (loss.use_tis)."""
    return config.loss.old_logp == "rollout" or bool(config.loss.use_tis)


def admit(sample: Sample, config, *, vocab_size: int, policy_version: int,
          topk: int | None = None) -> str | None:
    """None if `sample` may be trained now by a policy at `policy_version`, else the drop
    reason, one of `DROP_REASONS` (logged). `topk`: the top-K width of the step being gathered
    (None: not known yet); one step packs one width (`rollout.teacher_topk` when set)."""
    try:
        sample.validate(vocab_size=vocab_size)
        if needs_rollout_logp(config):
            require_rollout_logp(sample, "(loss.old_logp = 'rollout' or loss.use_tis)")
        width = sample.topk_width
        topk = config.rollout.teacher_topk or topk
        if width is not None and topk is not None and width != topk:
            raise SampleError(sample.sample_id, "teacher_topk_logp", f"K = {width}",
                              f"K = {topk}, the top-K width of this step's samples "
                              "(rollout.teacher_topk, else the first top-K sample's)")
    except SampleError as e:
        log.warning("rejected: %s", e)
        return "invalid"
    trainer = config.trainer
    if len(sample.tokens) > trainer.token_budget:
        log.warning("rejected sample %r: %d tokens > trainer.token_budget %d",
                    sample.sample_id, len(sample.tokens), trainer.token_budget)
        return "too_long"
    if trainer.max_response_len and sample.response_len > trainer.max_response_len:
        log.warning("rejected sample %r: a %d-token response > trainer.max_response_len %d",
                    sample.sample_id, sample.response_len, trainer.max_response_len)
        return "too_long"
    if 0 <= trainer.max_staleness < policy_version - sample.policy_version:
        return "stale"
    return None
