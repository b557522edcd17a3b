"""The generating endpoints: SGLang's `/generate` and the OpenAI-compatible
`/v1/chat/completions` and `/v1/completions`. Each parses its body, builds the prompt ids,
settles the output length, checks it fits the context, queues the request on the engine and
answers through `replies`.

Output length when the request sets none (as SGLang): `/generate` min(128, what fits),
`/v1/completions` min(16, what fits), chat all that fits (`context_len - prompt_len`: SGLang's
chat sends `max_new_tokens = None`, which only the context caps), so a chat answer ends at EOS,
a stop, or a full context (finish_reason "length"). A `/generate` whose `sampling_params` say
`"max_new_tokens": null` explicitly gets all that fits as well: SGLang's scheduler caps a None
`max_new_tokens` by the context only (the rollout proxy relies on it for chat requests that set
no length). `min_new_tokens` (OpenAI `min_tokens`) above the settled length is a 400 naming
both values (SGLang's "min_new_tokens must be in [0, max_new_tokens]"), also when the length
is a default: the request cannot get its minimum.
"""

from __future__ import annotations

import time

from aiohttp import web

from clawjax.serving import chat, completions
from clawjax.serving.context import CTX, ServerContext, read_json, submit, tokenize_text
from clawjax.serving.openai_requests import length_field
from clawjax.serving.protocol import (CHAT_MAX_TOKEN_KEYS, COMPLETION_MAX_TOKEN_KEYS,
                                      GENERATE_MAX_TOKEN_KEYS, ProtocolError, check_lengths,
                                      check_min_new_tokens, parse_chat, parse_completion,
                                      parse_generate)
from clawjax.serving.replies import openai_reply, reply, stream_state


def _length_set(body: dict, keys: tuple[str, ...]) -> bool:
    return any(k in body and body[k] is not None for k in keys)


def default_max_new_tokens(body: dict, params, prompt_len: int, context_len: int,
                           keys: tuple[str, ...], *, fill_context: bool = False) -> None:
    """A request that set none of `keys` (absent or null) gets min(its default, what fits),
    or with `fill_context` all that fits; what fits is `context_len - prompt_len` (>= 0). (For
    `/generate`, `fill_context` is "max_new_tokens is present, as null".)"""
    if not _length_set(body, keys):
        room = max(0, context_len - prompt_len)
        params.max_new_tokens = room if fill_context else min(params.max_new_tokens, room)


def _settle_length(body: dict, params, prompt_len: int, context_len: int,
                   keys: tuple[str, ...], *, fill_context: bool = False, prompt_field: str,
                   max_field: str, min_field: str, **lengths) -> None:
    """`default_max_new_tokens`, then `check_lengths` (`lengths`: its logprob arguments),
    then `min_new_tokens <= max_new_tokens` for a defaulted length (a length the request set
    was checked when it was parsed); the message says how the default came about."""
    default = params.max_new_tokens
    default_max_new_tokens(body, params, prompt_len, context_len, keys,
                           fill_context=fill_context)
    check_lengths(prompt_len, context_len, params, field=prompt_field, max_field=max_field,
                  **lengths)
    if not _length_set(body, keys):
        fits = f"the context length {context_len} minus the {prompt_len} prompt tokens"
        check_min_new_tokens(params, min_field, max_field,
                             defaulted=fits if fill_context else f"min({default}, {fits})")


async def generate(request: web.Request) -> web.StreamResponse:
    ctx: ServerContext = request.app[CTX]
    body = await read_json(request)
    req = parse_generate(body, ctx.engine.config.vocab_size)
    prompt = req.input_ids if req.input_ids is not None else tokenize_text(ctx, req.text, "text")
    params = body.get("sampling_params") or {}
    _settle_length(params, req.sampling, len(prompt), ctx.engine.context_len,
                   GENERATE_MAX_TOKEN_KEYS, fill_context="max_new_tokens" in params,
                   prompt_field="input_ids" if req.input_ids is not None else "text",
                   max_field="sampling_params.max_new_tokens",
                   min_field="sampling_params.min_new_tokens",
                   return_logprob=req.return_logprob, logprob_start_len=req.logprob_start_len)
    if req.sampling.stop and ctx.tokenizer is None:
        raise ProtocolError("sampling_params.stop", req.sampling.stop,
                            "stop_token_ids (stop strings need tokenizer files)")
    r, events = submit(ctx, prompt, req.sampling, rid=req.rid, stream=req.stream,
                       return_logprob=req.return_logprob,
                       logprob_start_len=req.logprob_start_len,
                       top_logprobs_num=req.top_logprobs_num,
                       return_text_in_logprobs=req.return_text_in_logprobs)

    def part(result: dict, final: bool) -> dict:
        if not final:  # an incomplete UTF-8 character waits (as SGLang's does)
            text = result["text"]
            result["text"] = text[:len(text) - chat.undecided_tail(text, ())]
        return result

    return await reply(request, ctx, r, events, stream=req.stream, whole=lambda res: res,
                       part=part)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx: ServerContext = request.app[CTX]
    body = await read_json(request)
    req = parse_chat(body, ctx.engine.config.vocab_size)
    prompt = chat.encode_messages(ctx.tokenizer, req.messages)
    _settle_length(body, req.sampling, len(prompt), ctx.engine.context_len,
                   CHAT_MAX_TOKEN_KEYS, fill_context=True, prompt_field="messages",
                   max_field=length_field(body, CHAT_MAX_TOKEN_KEYS), min_field="min_tokens")
    r, events = submit(ctx, prompt, req.sampling, rid=req.rid, stream=req.stream,
                       return_logprob=req.logprobs, top_logprobs_num=req.top_logprobs)
    name = req.model or ctx.served_model_name
    created = int(time.time())
    st = stream_state(req, req.sampling)

    def part(result: dict, final: bool) -> dict:
        out, st["sent"] = chat.chunk(result, st["sent"], name, created, st["first"], final,
                                     stops=st["stops"], tokenizer=ctx.tokenizer,
                                     logprobs_from=st["n"])
        st["first"] = False
        if st["n"] is not None:
            st["n"] = len(result["output_ids"])
        return out

    return await openai_reply(
        request, ctx, r, events, req,
        lambda res: chat.completion(res, ctx.tokenizer, name, created, req), part,
        lambda res: chat.usage_chunk(res, name, created))


async def v1_completions(request: web.Request) -> web.StreamResponse:
    ctx: ServerContext = request.app[CTX]
    body = await read_json(request)
    req = parse_completion(body, ctx.engine.config.vocab_size)
    prompt = req.prompt if isinstance(req.prompt, list) else \
        tokenize_text(ctx, req.prompt, "prompt")
    _settle_length(body, req.sampling, len(prompt), ctx.engine.context_len,
                   COMPLETION_MAX_TOKEN_KEYS, prompt_field="prompt", max_field="max_tokens",
                   min_field="min_tokens")
    if req.sampling.stop and ctx.tokenizer is None:
        raise ProtocolError("stop", req.sampling.stop,
                            "stop_token_ids (stop strings need tokenizer files)")
    r, events = submit(ctx, prompt, req.sampling, rid=req.rid, stream=req.stream,
                       return_logprob=req.logprobs is not None,
                       top_logprobs_num=req.logprobs or 0)
    name = req.model or ctx.served_model_name
    created = int(time.time())
    st = stream_state(req, req.sampling)

    def part(result: dict, final: bool) -> dict:
        out, st["sent"] = completions.chunk(result, st["sent"], name, created, final,
                                            stops=st["stops"], tokenizer=ctx.tokenizer,
                                            logprobs_from=st["n"])
        if st["n"] is not None:
            st["n"] = len(result["output_ids"])
        return out

    return await openai_reply(
        request, ctx, r, events, req,
        lambda res: completions.completion(res, ctx.tokenizer, name, created, req), part,
        lambda res: completions.usage_chunk(res, name, created))
