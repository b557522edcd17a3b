"""The held-out evaluation's version labels: each answer's `meta_info.weight_version` is read, a
point answered by one version is labelled with it, a periodic point whose answers came from
several versions (training publishes during it) records them all, and the run's two endpoints
must be one version. A stand-in policy client (no HTTP, no model) and a stand-in judge."""

import asyncio
import json
import time
import types

import pytest

from clawjax import default_task, evaluate

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
        return types.SimpleNamespace(reward=1 if view.response == "4" else -1)

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
