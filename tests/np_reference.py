"""Independent NumPy float64 reference for the loss library, written from SPEC.md §1–§5.

It never calls clawjax code: per-token formulas are written out element by element, reductions
loop over samples explicitly, and `sample_loss` works on host `Sample`s directly (no packing),
so tests can compare packed, chunked, jitted float32 results against it.
"""

from __future__ import annotations

import math

import numpy as np


def f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


# ---------------------------------------------------------------- per token (SPEC §1, §3, §5)
def ppo(logp, old_logp, adv, eps=0.2, eps_high=0.28, dual_clip=None):
    """Returns (per-token loss, clipped indicator) in float64, element by element."""
    logp, old_logp, adv = np.broadcast_arrays(f64(logp), f64(old_logp), f64(adv))
    loss = np.empty(logp.shape)
    clipped = np.empty(logp.shape)
    for idx in np.ndindex(logp.shape):
        ratio = math.exp(logp[idx] - old_logp[idx])
        a = adv[idx]
        l1 = -ratio * a
        l2 = -min(max(ratio, 1.0 - eps), 1.0 + eps_high) * a
        value = max(l1, l2)
        if dual_clip is not None and a < 0:
            value = min(value, -dual_clip * a)
        loss[idx] = value
        clipped[idx] = 1.0 if l2 > l1 else 0.0
    return loss, clipped


def ppo_grad(logp, old_logp, adv, eps=0.2, eps_high=0.28, dual_clip=None):
    """d ppo loss / d logp, element by element in float64: 0 where a clipped branch is strictly
    the one taken (l2 > l1, or the dual clip's −c·A < l), else d(−ratio·A)/d logp = −ratio·A.
    At a tie this is the unclipped branch's derivative: the true one where the loss is smooth
    at a clip bound (ratio = 1 − ε with A > 0, ratio = 1 + ε_high with A < 0)."""
    logp, old_logp, adv = np.broadcast_arrays(f64(logp), f64(old_logp), f64(adv))
    out = np.empty(logp.shape)
    for idx in np.ndindex(logp.shape):
        ratio, a = math.exp(logp[idx] - old_logp[idx]), adv[idx]
        l1, l2 = -ratio * a, -min(max(ratio, 1.0 - eps), 1.0 + eps_high) * a
        g = 0.0 if l2 > l1 else -ratio * a
        if dual_clip is not None and a < 0 and -dual_clip * a < max(l1, l2):
            g = 0.0
        out[idx] = g
    return out


def kl(logp, ref_logp, kind):
    d = f64(logp) - f64(ref_logp)
    if kind == "k1":
        return d
    if kind == "k2":
        return d * d / 2.0
    if kind == "low_var_kl":
        x = -d                                    # ref − logp
        with np.errstate(over="ignore"):
            k3 = np.expm1(x) - x                  # e^x − 1 − x (expm1: exact near x = 0)
        return np.clip(k3, -10.0, 10.0)
    raise ValueError(kind)


def kl_grad(logp, ref_logp, kind):
    """d kl / d logp, element by element in float64 (0 where low_var_kl sits at its clamp)."""
    d = f64(logp) - f64(ref_logp)
    if kind == "k1":
        return np.ones_like(d)
    if kind == "k2":
        return d
    if kind == "low_var_kl":
        x = -d                                    # ref − logp; d(e^x − 1 − x)/d logp
        with np.errstate(over="ignore"):
            return np.where(np.abs(np.expm1(x) - x) < 10.0, -np.expm1(x), 0.0)
    raise ValueError(kind)


def topk_reverse_kl(student, teacher):
    """Σ over K bins + tail of p_s (log p_s − log p_t); tail = log(1 − exp(min(lse, −1e−7))).
    A bin with p_s = 0 (log-prob −inf, or exp underflowing in float64) adds 0: 0·log 0 = 0."""
    student, teacher = f64(student), f64(teacher)
    out = np.empty(student.shape[:-1])
    for idx in np.ndindex(out.shape):
        bins = []
        for row in (student[idx], teacher[idx]):
            m = row.max()
            lse = m + math.log(sum(math.exp(v - m) for v in row))
            tail = math.log(1.0 - math.exp(min(lse, -1e-7)))
            bins.append(list(row) + [tail])
        s, t = bins
        out[idx] = sum(math.exp(a) * (a - b) for a, b in zip(s, t) if math.exp(a) > 0.0)
    return out


def topk_reverse_kl_grad(student, teacher):
    """d topk_reverse_kl / d student, float64, from the formula written out by hand:
    with p_k = exp(s_k), tail mass T = 1 − Σ p_k and d = log p_s − log p_t per bin,
    ∂/∂s_k = p_k (d_k + 1) − p_k (d_tail + 1) = p_k (d_k − d_tail) while lse < −1e−7;
    where the tail is floored (lse ≥ −1e−7) it is a constant and ∂/∂s_k = p_k (d_k + 1)."""
    student, teacher = f64(student), f64(teacher)
    out = np.empty(student.shape)
    for idx in np.ndindex(student.shape[:-1]):
        tails = []
        for row in (student[idx], teacher[idx]):
            lse = math.log(sum(math.exp(v) for v in row))
            tails.append((lse, math.log(1.0 - math.exp(min(lse, -1e-7)))))
        (lse_s, tail_s), (_, tail_t) = tails
        for k, (a, b) in enumerate(zip(student[idx], teacher[idx])):
            if math.exp(a) == 0.0:          # p_s = 0: p·(d + 1) → 0 as p → 0
                out[idx + (k,)] = 0.0
                continue
            g = math.exp(a) * (a - b + 1.0)
            if lse_s < -1e-7:
                g -= math.exp(a) * (tail_s - tail_t + 1.0)
            out[idx + (k,)] = g
    return out


def log_softmax(logits):
    logits = f64(logits)
    m = logits.max(axis=-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))


def token_logp_entropy(hidden, lm_head, targets):
    """Full float64 logits: hidden [..., T, D] @ lm_head [D, V] → (logp [..., T], entropy)."""
    logsm = log_softmax(f64(hidden) @ f64(lm_head))
    logp = np.take_along_axis(logsm, np.asarray(targets)[..., None], axis=-1)[..., 0]
    entropy = -(np.exp(logsm) * logsm).sum(axis=-1)
    return logp, entropy


def grpo(rewards, group_ids, scale_by_std=True, eps=1e-6):
    rewards = f64(rewards)
    out = np.empty(rewards.shape)
    for i, g in enumerate(group_ids):
        members = rewards[np.asarray(group_ids) == g]
        a = rewards[i] - members.mean()
        if scale_by_std:
            std = members.std(ddof=1) if len(members) > 1 else 0.0
            a = a / (std + eps)
        out[i] = a
    return out


# ---------------------------------------------------------------- reductions (SPEC §4)
def reduce_rows(values, loss_mask, segment_ids, mode):
    """(sum, denominator) over [R, L] rows by explicit loops over (row, segment)."""
    values, loss_mask, segment_ids = f64(values), np.asarray(loss_mask), np.asarray(segment_ids)
    if mode == "token_mean":
        sel = (loss_mask > 0) & (segment_ids > 0)
        return float(values[sel].sum()), float(sel.sum())
    total, count = 0.0, 0
    for r in range(values.shape[0]):
        for seg in sorted(set(segment_ids[r].tolist()) - {0}):
            sel = (segment_ids[r] == seg) & (loss_mask[r] > 0)
            if sel.any():
                total += values[r][sel].mean()
                count += 1
    return total, float(count)


def reduce_samples(per_sample_values, per_sample_masks, mode):
    """(sum, denominator) over a list of per-sample token arrays and their masks."""
    if mode == "token_mean":
        s = sum(f64(v)[np.asarray(m) > 0].sum() for v, m in zip(per_sample_values, per_sample_masks))
        c = sum(float((np.asarray(m) > 0).sum()) for m in per_sample_masks)
        return float(s), c
    total, count = 0.0, 0
    for v, m in zip(per_sample_values, per_sample_masks):
        sel = np.asarray(m) > 0
        if sel.any():
            total += f64(v)[sel].mean()
            count += 1
    return total, float(count)


# ---------------------------------------------------------------- whole loss
def per_token_terms(logp, old_logp, rollout_logp, reward, teacher_logp, teacher_mask, cfg,
                    ref_logp=None, entropy=None, student_topk=None, teacher_topk=None,
                    topk_mask=1.0):
    """Per-token loss pieces for one set of tokens (any shape). `cfg` is a dict of LossConfig
    fields; `teacher_mask` / `topk_mask` broadcast against logp (the OPD term and the top-K
    term are 0 where they are 0, whatever the teacher arrays hold). Returns a dict of float64
    arrays: loss (the per-token total), pg_loss, clipfrac, ppo_kl, advantage_mean, and
    kl / entropy / topk_kl / tis_weight where applicable."""
    logp, old_logp = f64(logp), f64(old_logp)
    opd = np.where(f64(teacher_mask) > 0, f64(teacher_logp) - old_logp, 0.0)
    adv = cfg["w_rl"] * f64(reward) + cfg["w_opd"] * opd
    pg, clipped = ppo(logp, old_logp, adv, cfg["eps_clip"], cfg["eps_clip_high"],
                      cfg["dual_clip"])
    out = {}
    if cfg["use_tis"]:
        w = np.minimum(np.exp(old_logp - f64(rollout_logp)), cfg["tis_cap"])
        pg = pg * w
        out["tis_weight"] = w
    total = pg.copy()
    out.update(pg_loss=pg, clipfrac=clipped, ppo_kl=old_logp - logp,
               advantage_mean=adv * np.ones_like(logp))
    if ref_logp is not None:
        k = kl(logp, ref_logp, cfg["kl_kind"])
        out["kl"] = k
        total = total + cfg["kl_coef"] * k
    if entropy is not None:
        out["entropy"] = f64(entropy)
        total = total - cfg["entropy_coef"] * f64(entropy)
    if student_topk is not None and teacher_topk is not None:
        t = np.where(f64(topk_mask) > 0, topk_reverse_kl(student_topk, teacher_topk), 0.0)
        out["topk_kl"] = t
        total = total + cfg["topk_coef"] * t
    out["loss"] = total
    return out


def sample_loss(samples, logp, cfg, old_logp=None, ref_logp=None, entropy=None,
                student_topk=None):
    """The combined loss computed sample by sample from host `Sample`s, no packing.

    logp / old_logp / ref_logp / entropy: dicts sample_id → [response_len] arrays (old_logp
    defaults to the sample's rollout_logp); student_topk: sample_id → [response_len, K].
    Returns dict metric → (sum, denominator), with num_tokens / num_samples as (count, 0).
    """
    per_metric: dict[str, list] = {}
    masks = []
    for s in samples:
        sid = s.sample_id
        old = s.rollout_logp if old_logp is None else old_logp[sid]
        has_topk = s.teacher_topk_logp is not None and student_topk is not None
        terms = per_token_terms(
            logp[sid], old, s.rollout_logp, s.reward,
            s.teacher_logp if s.teacher_logp is not None else np.zeros(s.response_len),
            1.0 if s.teacher_logp is not None else 0.0, cfg,
            ref_logp=None if ref_logp is None else ref_logp[sid],
            entropy=None if entropy is None else entropy[sid],
            student_topk=student_topk[sid] if has_topk else None,
            teacher_topk=s.teacher_topk_logp if has_topk else None)
        if student_topk is not None and not has_topk:
            terms["topk_kl"] = np.zeros(s.response_len)
        for k, v in terms.items():
            per_metric.setdefault(k, []).append(v)
        masks.append(s.loss_mask)
    out = {k: reduce_samples(v, masks, cfg["reduction"]) for k, v in per_metric.items()}
    out["num_tokens"] = (float(sum((np.asarray(m) > 0).sum() for m in masks)), 0.0)
    out["num_samples"] = (float(sum(bool((np.asarray(m) > 0).any()) for m in masks)), 0.0)
    return out


def divide(terms):
    return {k: s / max(d, 1.0) for k, (s, d) in terms.items()}
