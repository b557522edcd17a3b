"""The held-out evaluation's version labels: each answer's `meta_info.weight_version` is read, a
point answered by one version is labelled with it, a periodic point whose answers came from
several versions (training publishes during it) records them all, and the run's two endpoints
must be one version. A stand-in policy client (no HTTP, no model) and a stand-in judge.

Then the judging, on loopback with real servers (a scripted policy server and the rule judge):
an answer without a valid judge vote is left out and counted, and a judge outage fails the
evaluation instead of being recorded as a score of 0."""

import asyncio
import json
import time
import types

import pytest
from aiohttp import web
from scripted_upstream import AppThread

from clawjax import default_task, evaluate
from clawjax.rollout import rule_judge
from clawjax.serving.client import ServingError
from clawjax.tokenizer import build_tokenizer

TASKS = default_task.split_tasks(0.1, 0)[1][:6]


class Tokenizer:
    """What `evaluate._one` calls on a tokenizer, and nothing else."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return messages[-1]["content"]

    def encode(self, text, add_special_tokens=False):
        return [1, 2]

    def decode(self, ids, skip_special_tokens=True):
        return "4"


class Server:
    """The serving policy: `version` now (`info_version` answers /get_model_info when set);
    `publish_every` > 0 advances the version by 2 after that many answers, as the trainer's
    publisher does during an evaluation; `label` False leaves meta_info out."""

    def __init__(self, version: int, publish_every: int = 0, label: bool = True):
        self.version, self.publish_every, self.label = version, publish_every, label
        self.info_version: str | None = None
        self.answered = 0

    def client(self, url):
        server = self

        class Client:
            async def __aenter__(self):
                return self

            async def __aexit__(self, *exc):
                return False

            async def get_weight_version(self):
                return server.info_version or str(server.version)

            async def generate(self, input_ids, sampling_params):
                out = {"output_ids": [3]}
                if server.label:
                    out["meta_info"] = {"weight_version": str(server.version)}
                server.answered += 1
                if server.publish_every and server.answered % server.publish_every == 0:
                    server.version += 2
                await asyncio.sleep(0)
                return out

        return Client()


@pytest.fixture
def serve(monkeypatch):
    async def judge(client, view, **kwargs):
        reward = 1 if view.response == "4" else -1
        return types.SimpleNamespace(reward=reward, votes=[reward])

    monkeypatch.setattr(evaluate.judge_lib, "judge_turn", judge)

    def install(server: Server) -> Server:
        monkeypatch.setattr(evaluate, "SGLangClient", server.client)
        return server

    return install


def _evaluate(**kwargs):
    return asyncio.run(evaluate.evaluate_async("policy", "judge", Tokenizer(), TASKS,
                                               samples_per_task=4, concurrency=8, **kwargs))


def test_a_steady_server_gives_a_point_of_its_one_version(serve):
    serve(Server(8))
    result = _evaluate()
    assert result.version == "8" and result.versions == {"8": 24} and not result.mixed
    assert result.n == 24 and result.score == 1.0
    assert result.to_json()["versions"] == {"8": 24}


def test_the_label_is_the_version_that_answered_not_the_one_read_first(serve):
    server = serve(Server(7))
    server.info_version = "6"   # a publish landed between the version check and the answers
    result = _evaluate()
    assert result.version == "7" and result.versions == {"7": 24}


def test_answers_without_a_version_label_are_the_version_read_at_the_start(serve):
    serve(Server(5, label=False))
    result = _evaluate()
    assert result.version == "5" and result.versions == {"5": 24}


def test_a_publish_during_a_periodic_point_is_recorded_not_hidden(serve):
    serve(Server(10, publish_every=7))
    result = _evaluate(single_version=False)
    assert result.mixed and result.version == "10"        # labelled with the first version
    assert list(result.versions) == ["10", "12", "14", "16"]
    assert sum(result.versions.values()) == result.n == 24
    assert result.versions == {"10": 7, "12": 7, "14": 7, "16": 3}


def test_an_endpoint_must_be_one_version(serve, tmp_path):
    serve(Server(10, publish_every=7))
    with pytest.raises(evaluate.MixedVersions, match="10, 12, 14, 16"):
        _evaluate(single_version=True)
    evaluator = evaluate.Evaluator("policy", "judge", Tokenizer(), TASKS, str(tmp_path))
    with pytest.raises(evaluate.MixedVersions):
        evaluator.evaluate_now()     # the run's warm-start and final scores
    assert evaluator.history == [] and not (tmp_path / "eval.jsonl").exists()


def test_the_periodic_evaluations_record_the_mix_in_eval_jsonl(serve, tmp_path):
    serve(Server(10, publish_every=7))
    evaluator = evaluate.Evaluator("policy", "judge", Tokenizer(), TASKS, str(tmp_path)).start()
    try:
        deadline = time.monotonic() + 10
        while evaluator.latest is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        evaluator.stop()
    entry = json.loads((tmp_path / "eval.jsonl").read_text().splitlines()[0])
    assert entry["version"] == "10" and len(entry["versions"]) > 1
    assert sum(entry["versions"].values()) == entry["n"]


def test_the_next_point_is_due_every_versions_past_the_newest_that_answered(serve, tmp_path):
    """A mixed point (answered by 10 to 16) counts from its newest version: version 18 is not
    yet 4 past it (it was, counted from the label 10, and a point followed too soon)."""
    serve(Server(10, publish_every=7))
    evaluator = evaluate.Evaluator("policy", "judge", Tokenizer(), TASKS, str(tmp_path),
                                   every_versions=4)
    evaluator.evaluate_now(single_version=False)
    assert list(evaluator.latest.versions) == ["10", "12", "14", "16"]
    assert not evaluator._due("18") and evaluator._due("20")


@pytest.mark.parametrize("every", [0, -3, 1.5, True])
def test_every_versions_must_be_a_positive_integer(tmp_path, every):
    """0 or less made every version due again at once (the same version re-scored every 0.5 s)."""
    with pytest.raises(ValueError, match=rf"every_versions = {every!r}.*integer >= 1"):
        evaluate.Evaluator("policy", "judge", Tokenizer(), TASKS, str(tmp_path),
                           every_versions=every)


# ------------------------------------------------------------ judging, with real servers
REAL_TASKS = TASKS[:3]


def _policy_app(forms: dict) -> web.Application:
    """An SGLang-style policy server at version 4: answers each task right, in the form
    `forms[task_id]` ("explain" satisfies the simulated user, "final_only" does not)."""
    tokenizer = build_tokenizer()
    app = web.Application()

    async def health(request):
        return web.Response(text="")

    async def info(request):
        return web.json_response({"weight_version": "4"})

    async def generate(request):
        prompt = tokenizer.decode((await request.json())["input_ids"])
        task = next(t for t in REAL_TASKS if t["question"] in prompt)
        ids = tokenizer.encode(default_task.answer(task, forms[task["task_id"]]),
                               add_special_tokens=False)
        return web.json_response({"text": "", "output_ids": ids,
                                  "meta_info": {"weight_version": "4"}})

    app.router.add_get("/health", health)
    app.router.add_get("/get_model_info", info)
    app.router.add_post("/generate", generate)
    return app


def _rule_judge(refuse: dict, how: str) -> web.Application:
    """The rule judge, except that the next `refuse[question]` votes on answers to the task of
    `question` fail: a 503 (`how` = "down") or an answer without a boxed vote ("no vote")."""

    @web.middleware
    async def flaky(request, handler):
        if request.path == "/v1/chat/completions":
            text = json.dumps((await request.json())["messages"])
            question = next((q for q in refuse if refuse[q] > 0 and q in text), None)
            if question is not None:
                refuse[question] -= 1
                if how == "down":
                    return web.json_response({"error": {"message": "restarting"}}, status=503)
                return web.json_response({"choices": [{"message": {
                    "role": "assistant", "content": "I cannot tell."}}]})
        return await handler(request)

    app = rule_judge.build_app()
    app.middlewares.append(flaky)
    return app


@pytest.fixture
def servers():
    """start(forms, refuse, how) -> (policy AppThread, judge AppThread); stops them after."""
    started = []

    def start(forms=None, refuse=None, how="down"):
        forms = forms or {t["task_id"]: "explain" for t in REAL_TASKS}
        started.append(AppThread(_policy_app(forms)))
        started.append(AppThread(_rule_judge(refuse or {}, how)))
        return started[-2], started[-1]

    yield start
    for app in started:
        if app.worker.running:
            app.stop()


def _evaluator(policy, judge, workdir):
    return evaluate.Evaluator(policy.url, judge.url, build_tokenizer(), REAL_TASKS, str(workdir),
                              samples_per_task=2, temperature=0.0)


def _recorded(workdir):
    path = workdir / "eval.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_judge_outage_is_not_recorded_as_a_score(servers, tmp_path):
    """The judge stops between two evaluations (as while the local stack restarts it): the
    second raises `JudgeUnavailable` (a `ServingError`: the periodic thread skips the point,
    the run's final evaluation reports the failure) and records nothing. It used to record
    0.0 for answers the judge had rated 1.0, a collapse on the curve and in the summary."""
    policy, judge = servers()
    evaluator = _evaluator(policy, judge, tmp_path)
    up = evaluator.evaluate_now()
    assert (up.score, up.n) == (1.0, 6)
    judge.stop()
    for single_version in (False, True):   # a periodic point, an endpoint
        with pytest.raises(ServingError, match=f"{judge.url}.*3 of 3 held-out "
                                               r"tasks \(6 of 6 answers") as raised:
            evaluator.evaluate_now(single_version=single_version)
        assert isinstance(raised.value, evaluate.JudgeUnavailable)
    assert evaluator.history == [up]
    assert [(e["score"], e["unjudged"]) for e in _recorded(tmp_path)] == [(1.0, 0)]


@pytest.mark.parametrize("how", ["down", "no vote"])
def test_answers_without_a_valid_vote_are_left_out_and_counted(servers, tmp_path, how):
    """One of task 0's two answers gets no valid vote: it is left out of the score, not counted
    as a failed answer (task 0 keeps its score 1.0, not 0.5); task 2's answers are judged -1."""
    forms = {t["task_id"]: "explain" for t in REAL_TASKS}
    forms[REAL_TASKS[2]["task_id"]] = "final_only"
    policy, judge = servers(forms, refuse={REAL_TASKS[0]["question"]: 1}, how=how)
    result = _evaluator(policy, judge, tmp_path).evaluate_now()
    assert result.task_scores == [1.0, 1.0, 0.0]
    assert result.score == pytest.approx(2 / 3)
    assert (result.n, result.unjudged, result.versions) == (5, 1, {"4": 5})
    [entry] = _recorded(tmp_path)
    assert (entry["n"], entry["unjudged"], entry["task_scores"]) == (5, 1, [1.0, 1.0, 0.0])


def test_a_task_without_any_judged_answer_fails_the_evaluation(servers, tmp_path):
    """A task none of whose answers was judged has no score: recording the others' would score
    a different task set, which the paired change by task cannot pair."""
    policy, judge = servers(refuse={REAL_TASKS[1]["question"]: 2})
    evaluator = _evaluator(policy, judge, tmp_path)
    with pytest.raises(ServingError, match=r"1 of 3 held-out tasks \(2 of 6") as raised:
        evaluator.evaluate_now(single_version=False)
    assert isinstance(raised.value, evaluate.JudgeUnavailable)
    assert evaluator.history == [] and _recorded(tmp_path) == []


def test_an_endpoint_is_tried_again_while_the_judge_is_down(servers, tmp_path):
    """The judge refuses every vote of the first try (as while the local stack restarts it):
    the run's endpoint is tried again and recorded once, instead of ending the run."""
    refuse = {t["question"]: 2 for t in REAL_TASKS}   # 2 answers per task: one whole try
    policy, judge = servers(refuse=refuse)
    evaluator = _evaluator(policy, judge, tmp_path)
    result = evaluator.evaluate_endpoint(patience_s=30, retry_every_s=0.1)
    assert (result.score, result.n, result.unjudged) == (1.0, 6, 0)
    assert all(left == 0 for left in refuse.values())
    assert [e["score"] for e in _recorded(tmp_path)] == [1.0]


def test_an_endpoint_gives_up_once_its_patience_is_spent(servers, tmp_path):
    """A judge that stays down: the endpoint raises `JudgeUnavailable` after its patience,
    having tried more than once, and records nothing."""
    policy, judge = servers()
    judge.stop()
    evaluator = _evaluator(policy, judge, tmp_path)
    tries = []
    once = evaluator.evaluate_now
    evaluator.evaluate_now = lambda *args: tries.append(args) or once(*args)
    with pytest.raises(evaluate.JudgeUnavailable):
        evaluator.evaluate_endpoint(patience_s=1.0, retry_every_s=0.1)
    assert len(tries) >= 2   # tried again before giving up
    assert evaluator.history == [] and _recorded(tmp_path) == []


def test_history_keeps_answer_texts_on_the_first_and_latest_point_only(serve, tmp_path):
    """A week-long run evaluates thousands of times: every score stays in `history`, but the
    answer texts (about 12 KB a point) only on the first point (the warm start's) and the
    latest."""
    serve(Server(4))
    evaluator = evaluate.Evaluator("policy", "judge", Tokenizer(), TASKS, str(tmp_path))
    for _ in range(4):
        evaluator.evaluate_now()
    assert [len(r.examples) for r in evaluator.history] == [len(TASKS), 0, 0, len(TASKS)]
    assert [r.score for r in evaluator.history] == [1.0] * 4


def test_a_point_that_cannot_be_written_is_not_kept_either(serve, tmp_path):
    """eval.jsonl is written first: a failed write (here the path is a directory) records the
    point nowhere, so a retried endpoint does not leave it twice in `history`."""
    serve(Server(4))
    (tmp_path / "eval.jsonl").mkdir()
    evaluator = evaluate.Evaluator("policy", "judge", Tokenizer(), TASKS, str(tmp_path))
    with pytest.raises(IsADirectoryError):
        evaluator.evaluate_now()
    assert evaluator.history == []
