"""Async client for one SGLang server (or the embedded JAX server) over SGLang's native API.

    async with SGLangClient("http://127.0.0.1:30000") as c:
        out = await c.generate(input_ids=[...], sampling_params={"max_new_tokens": 16},
                               return_logprob=True)
        out["output_ids"], out["meta_info"]["output_token_logprobs"]   # [(logprob, id, text)]
        t = await c.teacher_logprobs(prompt_ids, response_ids, top_k=0)   # SPEC.md §7

Errors: `BadRequest` (4xx: the request is wrong; retrying elsewhere will not help) and
`ServerUnavailable` (connection refused/reset, timeout, 5xx: the server is at fault; a fleet
retries on another server). A timeout is the subclass `RequestTimedOut`: the server did not
answer within the deadline, which a hung server and a healthy one running a long generation
both do; a fleet tells them apart with a health check. Every call has a deadline (`timeout`
seconds overall, connect within `connect_timeout`), so nothing hangs forever; a caller that
bounds a call otherwise (the fleet's weight loads, by health checks) may pass `math.inf`.
A stream event that is not JSON is the server's fault: `ServerUnavailable`. A 2xx answer to a
weight update or an admin call (`update_weights_from_disk`, `get_model_info`, ...) that is JSON
but not an object (`"OK"`, `null`, a list: a misbehaving proxy in front of the server) is the
server's fault too: `MalformedResponse`, naming the endpoint and the body. `/generate` and
chat answers are returned as they come (a batch `/generate` answers with a list); their
readers check them (`clawjax.rollout.answers`, `clawjax.serving.teacher`).

Transport: one `aiohttp.ClientSession` per client (keep-alive pool of `max_connections`),
opened on first use inside the caller's event loop; a client belongs to that loop. aiohttp
rather than httpx: on the proxy's serving path the HTTP client was most of the per-request CPU
(httpx/httpcore/anyio: 63% of the serving thread's busy samples under 32 sessions), and
aiohttp's C parser does the same call for a fraction of it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any, AsyncIterator

import aiohttp

from clawjax.serving import teacher


class ServingError(RuntimeError):
    """A serving call failed; `url` names the server."""

    def __init__(self, url: str, message: str, status: int | None = None,
                 param: str | None = None):
        self.url, self.status, self.param = url, status, param
        super().__init__(f"{url}: {message}")


class BadRequest(ServingError):
    """The server rejected the request (4xx); `param` names the field when it said which."""


class ServerUnavailable(ServingError):
    """The server could not answer (connection error, timeout, 5xx)."""


class MalformedResponse(ServingError):
    """The server answered 2xx with a body the API does not define (JSON that is not an
    object). It is up and answering, so not `ServerUnavailable`: a fleet counts a weight
    update answered so as refused by that server (it stays up and the update is retried)."""


class RequestTimedOut(ServerUnavailable):
    """The call's deadline passed before the whole answer arrived (the server may be hung, or
    healthy and still generating)."""


@dataclasses.dataclass(frozen=True)
class Response:
    """A whole HTTP answer: `status_code`, raw `content`; `text` / `json()` decode it."""

    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


def _message(resp: Response) -> tuple[str, str | None]:
    try:
        body = resp.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"HTTP {resp.status_code}: {resp.text[:300]}", None
    if isinstance(body, dict):
        err = body.get("error") if isinstance(body.get("error"), dict) else body
        msg = err.get("message") or err.get("detail") or body
        return f"HTTP {resp.status_code}: {msg}", err.get("param")
    return f"HTTP {resp.status_code}: {body}", None


async def _lines(stream: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The lines of a body as they arrive (without "\n"), of any length: a streamed event
    carries all output ids and log-probs so far, beyond aiohttp's readline limit."""
    pending = b""
    async for chunk in stream.iter_any():
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line
    if pending:
        yield pending


class SGLangClient:
    """One server. Args: base_url (`http://host:port`), api_key (sent as Bearer), timeout
    (seconds per call, overall), connect_timeout (seconds to connect)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 120.0,
                 connect_timeout: float = 5.0, max_connections: int = 256):
        self.url = base_url.rstrip("/")
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.max_connections = max_connections
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                headers=self._headers,
                connector=aiohttp.TCPConnector(limit=self.max_connections),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout))
        return self._http

    async def __aenter__(self) -> "SGLangClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()

    # --- transport -------------------------------------------------------------------------
    def _send(self, method: str, path: str, body: Any):
        """The aiohttp request context for `path` with `body` (None: no body) as JSON."""
        if body is None:
            return self._session().request(method, self.url + path)
        return self._session().request(method, self.url + path, data=json.dumps(body).encode(),
                                       headers={"Content-Type": "application/json"})

    async def request(self, method: str, path: str, body: Any = None,
                      timeout: float | None = None) -> Response:
        """One HTTP call with an overall deadline; maps failures onto BadRequest /
        ServerUnavailable."""
        deadline = timeout or self.timeout
        try:
            async with asyncio.timeout(deadline):
                async with self._send(method, path, body) as answer:
                    resp = Response(answer.status, await answer.read())
        except TimeoutError:
            raise RequestTimedOut(self.url, f"{method} {path} timed out after {deadline}s")
        except aiohttp.ClientError as e:
            raise ServerUnavailable(self.url, f"{method} {path}: {type(e).__name__}: {e}")
        self._raise_for_status(resp, method, path)
        return resp

    def _raise_for_status(self, resp: Response, method: str, path: str) -> None:
        """ServerUnavailable for a 5xx answer, BadRequest for a 4xx one (with the server's
        message and the field it named)."""
        if resp.status_code >= 400:
            msg, param = _message(resp)
            cls = ServerUnavailable if resp.status_code >= 500 else BadRequest
            raise cls(self.url, f"{method} {path}: {msg}", resp.status_code, param)

    async def _json(self, method: str, path: str, body: Any = None,
                    timeout: float | None = None) -> Any:
        resp = await self.request(method, path, body, timeout)
        try:
            return resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {"text": resp.text}

    async def _object(self, method: str, path: str, body: Any = None,
                      timeout: float | None = None) -> dict:
        """`_json` for the calls whose answer is a JSON object; `MalformedResponse` naming
        `path` and the body when it is another JSON value."""
        out = await self._json(method, path, body, timeout)
        if not isinstance(out, dict):
            raise MalformedResponse(self.url, f"{method} {path} answered {out!r:.200}, "
                                    "expected a JSON object")
        return out

    # --- native API --------------------------------------------------------------------------
    async def generate_raw(self, body: dict, timeout: float | None = None) -> dict:
        """POST /generate with a full SGLang body (non-streaming)."""
        return await self._json("POST", "/generate", body, timeout)

    async def generate(self, input_ids: list[int] | None = None, text: str | None = None,
                       sampling_params: dict | None = None, *, return_logprob: bool = False,
                       logprob_start_len: int | None = None,
                       top_logprobs_num: int | None = None, rid: str | None = None,
                       timeout: float | None = None, **extra) -> dict:
        """POST /generate. Returns SGLang's response: `text`, `output_ids`, `meta_info`
        (`finish_reason`, `prompt_tokens`, `completion_tokens`, `weight_version`, and with
        `return_logprob` the `input_token_logprobs` / `output_token_logprobs` triples)."""
        body: dict[str, Any] = {"sampling_params": dict(sampling_params or {}), **extra}
        if input_ids is not None:
            body["input_ids"] = [int(t) for t in input_ids]
        if text is not None:
            body["text"] = text
        if return_logprob:
            body["return_logprob"] = True
        if logprob_start_len is not None:
            body["logprob_start_len"] = logprob_start_len
        if top_logprobs_num:
            body["top_logprobs_num"] = top_logprobs_num
        if rid is not None:
            body["rid"] = rid
        return await self.generate_raw(body, timeout)

    async def generate_stream(self, body: dict, timeout: float | None = None
                              ) -> AsyncIterator[dict]:
        """POST /generate with `stream: true`; yields each SSE event's JSON (text so far,
        output_ids so far, meta_info; the last one carries `finish_reason`)."""
        async for event in self._sse("/generate", {**body, "stream": True}, timeout):
            yield event

    async def chat_completions(self, body: dict, timeout: float | None = None) -> dict:
        """POST /v1/chat/completions (OpenAI body, non-streaming)."""
        return await self._json("POST", "/v1/chat/completions", {**body, "stream": False},
                                timeout)

    async def chat_completions_stream(self, body: dict, timeout: float | None = None
                                      ) -> AsyncIterator[dict]:
        async for event in self._sse("/v1/chat/completions", {**body, "stream": True}, timeout):
            yield event

    async def _sse(self, path: str, body: dict, timeout: float | None) -> AsyncIterator[dict]:
        deadline = timeout or self.timeout
        try:
            async with asyncio.timeout(deadline):
                async with self._send("POST", path, body) as answer:
                    if answer.status >= 400:
                        self._raise_for_status(Response(answer.status, await answer.read()),
                                               "POST", path)
                    async for raw in _lines(answer.content):
                        line = raw.decode("utf-8", errors="replace").rstrip("\r")
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            return
                        try:
                            event = json.loads(data)
                        except ValueError as e:  # the server's fault, as a 5xx would be
                            raise ServerUnavailable(self.url, f"POST {path}: a stream event "
                                                    f"that is not JSON ({e}): {data[:80]!r}")
                        yield event
        except TimeoutError:
            raise RequestTimedOut(self.url, f"POST {path} stream timed out after {deadline}s")
        except aiohttp.ClientError as e:
            raise ServerUnavailable(self.url, f"POST {path}: {type(e).__name__}: {e}")

    async def update_weights_from_disk(self, model_path: str, weight_version: str | None = None,
                                       timeout: float | None = None, **extra) -> dict:
        """POST /update_weights_from_disk; returns `{"success", "message", ...}`. A server
        that answers `success: false` raises BadRequest with its message; one whose answer is
        not a JSON object, MalformedResponse."""
        body = {"model_path": model_path, **extra}
        if weight_version is not None:
            body["weight_version"] = weight_version
        out = await self._object("POST", "/update_weights_from_disk", body, timeout)
        if not out.get("success", False):
            raise BadRequest(self.url, f"update_weights_from_disk({model_path!r}) failed: "
                             f"{out.get('message')}")
        return out

    async def get_model_info(self) -> dict:
        return await self._object("GET", "/get_model_info")

    async def get_server_info(self) -> dict:
        return await self._object("GET", "/get_server_info")

    async def get_weight_version(self) -> str | None:
        """The server's weight_version (from /get_model_info, which SGLang and the embedded
        server both report)."""
        return (await self.get_model_info()).get("weight_version")

    async def flush_cache(self) -> None:
        await self.request("POST", "/flush_cache")

    async def _answers(self, path: str, timeout: float) -> bool:
        """True when GET `path` answers 2xx within `timeout` (any `ServingError`: False)."""
        try:
            await self.request("GET", path, timeout=timeout)
            return True
        except ServingError:
            return False

    async def health(self, timeout: float = 5.0) -> bool:
        """True when GET /health answers 200 within `timeout`."""
        return await self._answers("/health", timeout)

    async def responsive(self, timeout: float = 5.0) -> bool:
        """True when the server's HTTP front answers GET /get_model_info within `timeout`. Unlike
        `/health` (on SGLang a one-token generation unless SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION
        is off, which waits while weights load) it is answered during a weight load: a server
        that does not answer it is hung or gone."""
        return await self._answers("/get_model_info", timeout)

    async def health_generate(self, timeout: float = 60.0) -> bool:
        return await self._answers("/health_generate", timeout)

    async def pause_generation(self, mode: str = "abort") -> dict:
        """POST /pause_generation (`mode`: abort | retract | in_place)."""
        return await self._object("POST", "/pause_generation", {"mode": mode})

    async def continue_generation(self) -> dict:
        return await self._object("POST", "/continue_generation", {})

    async def abort_request(self, rid: str | None = None, abort_all: bool = False) -> dict:
        return await self._object("POST", "/abort_request",
                                  {"rid": rid, "abort_all": abort_all})

    async def teacher_logprobs(self, prompt_ids, response_ids, top_k: int = 0,
                               timeout: float | None = None) -> teacher.TeacherLogprobs:
        """Log-probs of `response_ids` after `prompt_ids` (SPEC.md §7); see
        `clawjax.serving.teacher`. Raises TeacherLogprobError on an incomplete answer."""
        body = teacher.teacher_request(prompt_ids, response_ids, top_k)
        return teacher.parse_teacher_response(await self.generate_raw(body, timeout),
                                              prompt_ids, response_ids, top_k)
