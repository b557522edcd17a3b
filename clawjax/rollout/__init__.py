"""The rollout side (SPEC.md §7–§8): agents talk to an OpenAI-compatible proxy instead of the
model; every main-line turn is judged from its next state (PRM votes → reward, hint →
teacher log-probs) and emitted as `Sample`s to the gRPC buffer.

Modules:
  proxy       the HTTP app, its wiring (`ProxyConfig`, `start`, `ProxyThread`)
  proxy_state   `Proxy`: what the handlers share, and the session hooks of a served request
  chatapi     OpenAI request parsing and the SGLang `/generate` body
  policy_calls  `/generate` calls to the policy fleet, whole or streamed, with their errors
  chat_bodies   `chat.completion` bodies and SSE chunks
  sessions    session state machine (pure)
  prompts     every judge prompt and the parser of their layout
  judge       vote parsing, majority, hint selection, teacher context, async voting
  emit        samples by method, the drop counters
  judge_loop  the asynchronous judge → teacher → emission pipeline
  pusher      the batched, never-dropping push of samples to the buffer
  judge_thread  the judge loop on its own thread and event loop (serving never queues behind it)
  rule_judge  a deterministic keyword judge behind the same OpenAI API
  envs, tasks, runner   agent environments and the driver that runs them through the proxy

CLI: `python -m clawjax.rollout serve ...` (see `__main__.py`).
"""
