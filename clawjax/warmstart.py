"""The supervised warm start of the default task: a tiny Qwen3 learns single-digit additions in
both answer forms (and to follow the hint) before the online loop starts.

The result is an HF model directory (`workdir/warmstart/`: safetensors, config.json, tokenizer
files with the chat template) that the embedded server serves and the trainer starts from. It is
cached: a second run with the same settings (recorded in `warmstart.json`) skips training.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from clawjax import batch as batch_lib
from clawjax import default_task, losses
from clawjax import model as model_lib
from clawjax.sample import Sample
from clawjax.tokenizer import IM_END, PAD_TOKEN, build_tokenizer

MARKER = "warmstart.json"


def encode(tokenizer, messages: list[dict], answer: str | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids with the generation prompt, response ids ending in <|im_end|>)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    if answer is None:
        return prompt, []
    response = tokenizer.encode(answer, add_special_tokens=False)
    return prompt, response + [tokenizer.convert_tokens_to_ids(IM_END)]


def tiny_hf_config(tokenizer, settings) -> dict:
    """The default task's policy: a tiny Qwen3 sized by `settings` (a ConfigDict)."""
    return dict(
        model_type="qwen3", vocab_size=len(tokenizer), hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size, num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads, num_key_value_heads=settings.num_kv_heads,
        head_dim=settings.hidden_size // settings.num_heads, rms_norm_eps=1e-6,
        rope_theta=10000.0, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END),
                      tokenizer.convert_tokens_to_ids(PAD_TOKEN)],
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
    )


def _fingerprint(settings) -> str:
    return hashlib.sha256(json.dumps(settings.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def is_cached(out_dir: str, settings) -> bool:
    path = os.path.join(out_dir, MARKER)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f).get("fingerprint") == _fingerprint(settings)


def sft_samples(tokenizer, settings) -> list[Sample]:
    train, _ = default_task.split_tasks(settings.heldout_share, settings.seed)
    examples = default_task.warmstart_examples(
        train, settings.examples, explain_share=settings.explain_share,
        hinted_share=settings.hinted_share, seed=settings.seed)
    out = []
    for i, (messages, answer) in enumerate(examples):
        prompt, response = encode(tokenizer, messages, answer)
        out.append(Sample(sample_id=f"sft-{i}", tokens=prompt + response,
                          response_len=len(response)))
    return out


def _make_step(graphdef, optimizer):
    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            model = nnx.merge(graphdef, p)
            hidden = model.hidden(batch.tokens, batch.positions, batch.segment_ids)
            logp, _ = losses.sequence_logp_and_entropy(
                hidden, model.lm_head(), batch.tokens, batch.segment_ids, chunk=512)
            total, count = losses.reduce(-logp, batch.loss_mask, batch.segment_ids, "token_mean")
            return total / jnp.maximum(count, 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def lr_schedule(settings):
    """Linear warm-up over the first tenth of `settings.steps` (at most 100), then cosine decay
    to 5% of `settings.lr` at the last step. The warm-up leaves at least one step to the decay
    (optax refuses a decay over 0 steps): a 1-step warm start takes its one step at `lr`.
    Needs `steps` ≥ 1 (`config.validate`)."""
    steps = int(settings.steps)
    warmup = min(100, steps // 10 + 1, steps - 1)
    return optax.warmup_cosine_decay_schedule(0.0, settings.lr, warmup, steps,
                                              settings.lr * 0.05)


def warm_start(out_dir: str, settings, progress: bool = True) -> str:
    """Trains (or reuses) the warm-started policy in `out_dir`; returns `out_dir`."""
    if is_cached(out_dir, settings):
        return out_dir
    tokenizer = build_tokenizer()
    config = model_lib.ModelConfig.from_hf(tiny_hf_config(tokenizer, settings))
    model = model_lib.init_random(config, settings.seed, dtype=jnp.float32)
    graphdef, params = nnx.split(model, nnx.Param)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(lr_schedule(settings), weight_decay=0.01))
    opt_state = optimizer.init(params)
    step = _make_step(graphdef, optimizer)
    samples = sft_samples(tokenizer, settings)
    rng = np.random.default_rng(settings.seed)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=settings.steps, desc="warm start", unit="step", dynamic_ncols=True)
    loss = float("nan")
    for i in range(settings.steps):
        chosen = [samples[j] for j in rng.choice(len(samples), settings.batch_size, replace=False)]
        # Same row count every step (one compile): pad the bucket to a fixed number of rows.
        (packed,) = batch_lib.pack(chosen, settings.token_budget,
                                   row_buckets=(settings.rows,), row_multiple=1,
                                   need_rollout_logp=False)   # SFT: no policy ratio
        params, opt_state, loss = step(params, opt_state, packed)
        if bar is not None:
            bar.update(1)
            if i % 20 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
    if bar is not None:
        bar.close()
    nnx.update(model, params)
    _save(out_dir, model, config, tokenizer, {
        "fingerprint": _fingerprint(settings), "final_loss": float(loss),
        "settings": settings.to_dict()})
    return out_dir


def _save(out_dir: str, model, config, tokenizer, marker: dict) -> None:
    """Writes the model directory; the marker goes first out and last in, so a crash in
    between leaves no marker (the next run trains again) rather than an old marker vouching for
    new weights, and the new marker appears whole (written aside, fsynced, renamed)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MARKER)
    if os.path.exists(path):
        os.remove(path)
    model_lib.save_pretrained(model, config, out_dir, dtype=jnp.float32)
    tokenizer.save_pretrained(out_dir)
    with open(path + ".tmp", "w") as f:
        json.dump(marker, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
