"""clawjax.serving: talk to the policy fleet, and serve a policy locally with the same API.

    from clawjax.serving import SGLangClient, Fleet, SyncFleet
    async with Fleet(["http://gpu0:30000", "http://gpu1:30000"]) as fleet:
        out = await fleet.generate(input_ids=ids, sampling_params={"max_new_tokens": 64},
                                   return_logprob=True)
        t = await fleet.teacher_logprobs(prompt_ids, response_ids, top_k=0)
        await fleet.update_weights_from_disk("/publish/v12", weight_version="12")

Modules: `client` (one server, SGLang native API), `fleet` (N servers: least-loaded routing,
retries, health probes), `teacher` (teacher log-probs, SPEC.md §7), `sync` (blocking
wrappers), and the embedded JAX server: `protocol` (request validation; with `fields`,
`sampling_params`, `openai_requests`), `engine` (continuous batching over a KV cache, weight
versions; with `request`, `weights`, `steps`, `sampling`), `server` (HTTP app; with
`generation`, `admin`, `replies`, `context`, `chat`, `completions`), `launch` (model
directory → running server; `python -m clawjax.serve`).
The server side imports jax and aiohttp only when used.
"""

from clawjax.serving.client import (BadRequest, RequestTimedOut, SGLangClient,
                                    ServerUnavailable, ServingError)
from clawjax.serving.fleet import Fleet, FleetUnavailable
from clawjax.serving.sync import SyncFleet, run_on
from clawjax.serving.teacher import (TeacherLogprobError, TeacherLogprobs,
                                     parse_teacher_response, teacher_request)

__all__ = [
    "SGLangClient", "Fleet", "SyncFleet", "run_on", "ServingError", "BadRequest",
    "ServerUnavailable", "RequestTimedOut", "FleetUnavailable", "TeacherLogprobs",
    "TeacherLogprobError", "teacher_request", "parse_teacher_response",
]
