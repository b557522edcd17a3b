"""The grain task pipeline: deterministic with a seed, disjoint shards, resumable state; from a
JSONL file and from a tiny TFDS dataset built here (array_record, no TensorFlow)."""

import json

import numpy as np
import pytest

from clawjax.rollout import tasks
from clawjax.rollout.envs import env_for_task
from clawjax.rollout.envs.homework import homework_tasks


@pytest.fixture
def jsonl(tmp_path):
    path = str(tmp_path / "tasks.jsonl")
    tasks.write_jsonl_tasks(path, homework_tasks(30, seed=100))
    return path


def ids(stream_or_list):
    return [t["task_id"] for t in stream_or_list]


def test_jsonl_round_trip_and_tasks_drive_environments(jsonl):
    source = tasks.task_source(jsonl)
    assert len(source) == 30
    assert source[0] == {"env": "homework", "task_id": "hw-100", "seed": 100}
    env = env_for_task(source[5])
    assert env.reset(source[5]).role == "user"


def test_deterministic_and_seed_dependent(jsonl):
    source = tasks.JsonlTaskSource(jsonl)
    a = ids(tasks.TaskStream(source, seed=7).take(60))
    b = ids(tasks.TaskStream(tasks.JsonlTaskSource(jsonl), seed=7).take(60))
    c = ids(tasks.TaskStream(source, seed=8).take(60))
    assert a == b and a != c
    # Every epoch is a permutation of all tasks, and epochs are shuffled differently.
    assert sorted(a[:30]) == sorted(a[30:]) == sorted(f"hw-{i}" for i in range(100, 130))
    assert a[:30] != a[30:]
    assert ids(tasks.TaskStream(source, shuffle=False).take(3)) == ["hw-100", "hw-101", "hw-102"]


@pytest.mark.parametrize("shard_count", [1, 3, 4])
def test_shards_are_disjoint_and_cover_everything(jsonl, shard_count):
    source = tasks.JsonlTaskSource(jsonl)
    shards = [ids(tasks.TaskStream(source, seed=3, shard_index=i, shard_count=shard_count, num_epochs=1))
              for i in range(shard_count)]
    flat = [t for shard in shards for t in shard]
    assert len(flat) == len(set(flat)) == 30
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    # Every later epoch is again a partition of all tasks over the shards (reshuffled).
    epochs = [ids(tasks.TaskStream(source, seed=3, shard_index=i, shard_count=shard_count, num_epochs=3))
              for i in range(shard_count)]
    for e in range(3):
        part = [t for shard in epochs for t in shard[e * len(shard) // 3:(e + 1) * len(shard) // 3]]
        assert sorted(part) == sorted(flat)
    if shard_count > 1:
        assert epochs[0][:len(shards[0])] == shards[0]
        assert set(epochs[0][len(shards[0]):2 * len(shards[0])]) != set(shards[0])


def test_resume_from_saved_state(jsonl):
    source = tasks.JsonlTaskSource(jsonl)
    stream = tasks.TaskStream(source, seed=5, shard_index=1, shard_count=2)
    head = ids(stream.take(20))  # past the end of the first epoch of this shard (15 tasks)
    state = stream.get_state()
    tail = ids(stream.take(25))
    resumed = tasks.TaskStream(tasks.JsonlTaskSource(jsonl), seed=5, shard_index=1, shard_count=2)
    resumed.set_state(state)
    assert ids(resumed.take(25)) == tail
    fresh = ids(tasks.TaskStream(source, seed=5, shard_index=1, shard_count=2).take(45))
    assert fresh == head + tail


def test_state_of_another_seed_shard_or_file_is_rejected(jsonl, tmp_path):
    source = tasks.JsonlTaskSource(jsonl)
    stream = tasks.TaskStream(source, seed=5)
    stream.take(3)
    state = stream.get_state()
    with pytest.raises(tasks.TaskSourceError, match="state field 'seed' = 5, expected 6"):
        tasks.TaskStream(source, seed=6).set_state(state)
    with pytest.raises(tasks.TaskSourceError, match="state field 'shard_count' = 1, expected 2"):
        tasks.TaskStream(source, seed=5, shard_index=0, shard_count=2).set_state(state)
    with pytest.raises(tasks.TaskSourceError, match="'num_epochs' = None, expected 2"):
        tasks.TaskStream(source, seed=5, num_epochs=2).set_state(state)
    other = str(tmp_path / "other.jsonl")
    tasks.write_jsonl_tasks(other, homework_tasks(30, seed=200))
    other_source = tasks.JsonlTaskSource(other)
    other_source.path = jsonl  # same name, other content: the digest still differs
    with pytest.raises(tasks.TaskSourceError, match="state field 'source'.*sha256"):
        tasks.TaskStream(other_source, seed=5).set_state(state)
    with pytest.raises(tasks.TaskSourceError, match="state = 3"):
        stream.set_state(3)
    with pytest.raises(tasks.TaskSourceError, match="expected the bytes"):
        stream.set_state(b"{}")


def test_bad_files_and_options_are_named(tmp_path, jsonl):
    cases = {
        "not json": ('{"task_id": "a"}\n{oops\n', r":2: not a JSON object"),
        "no id": ('{"env": "homework"}\n', r":1: field 'task_id' = None"),
        "bad env": ('{"task_id": "a", "env": 3}\n', r"field 'env' = 3"),
        "list": ('[1, 2]\n', r"expected a JSON object, got list"),
        "repeat": ('{"task_id": "a"}\n\n{"task_id": "a"}\n', r":3: field 'task_id' = 'a' repeats line 1"),
        "empty": ("\n", r"no tasks"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.jsonl"
        path.write_text(text)
        with pytest.raises(tasks.TaskSourceError, match=message):
            tasks.JsonlTaskSource(str(path))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        tasks.task_source(str(tmp_path / "missing.jsonl"))
    source = tasks.JsonlTaskSource(jsonl)
    with pytest.raises(tasks.TaskSourceError, match=r"shard_index = 2, expected an int in \[0, 2\)"):
        tasks.task_dataset(source, shard_index=2, shard_count=2)
    with pytest.raises(tasks.TaskSourceError, match="shard_count = 0"):
        tasks.task_dataset(source, shard_count=0)
    with pytest.raises(tasks.TaskSourceError, match="has only 30 tasks"):
        tasks.task_dataset(source, shard_count=31)
    with pytest.raises(tasks.TaskSourceError, match="num_epochs = 0"):
        tasks.task_dataset(source, num_epochs=0)
    with pytest.raises(tasks.TaskSourceError, match="seed = -1"):
        tasks.task_dataset(source, seed=-1)
    with pytest.raises(tasks.TaskSourceError, match="expected tfds:NAME"):
        tasks.task_source("tfds:")


# -- TFDS ------------------------------------------------------------------------------------

def build_tiny_tfds(data_dir, records):
    """A GeneratorBasedBuilder prepared as array_record files under data_dir (no download).
    The class is not registered with TFDS: readers find the dataset from its files alone, as a
    rollout worker without this code would."""
    import tensorflow_datasets as tfds

    with tfds.core.registered.skip_registration():
        builder_class = _tiny_builder_class(tfds, records)
    builder = builder_class(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder


def _tiny_builder_class(tfds, records):
    class ClawjaxTinyTasks(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "task_id": tfds.features.Text(), "env": tfds.features.Text(),
                "seed": np.int64, "task_json": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(records[:-4]),
                    "test": self._generate_examples(records[-4:])}

        def _generate_examples(self, rows):
            for row in rows:
                yield row["task_id"], row

    return ClawjaxTinyTasks


def test_tfds_source_decodes_shards_and_resumes(tmp_path):
    records = [{"task_id": f"tf-{i}", "env": "homework", "seed": i,
                "task_json": json.dumps({"preference": "final_only"} if i % 2 else {})}
               for i in range(16)]
    build_tiny_tfds(tmp_path / "tfds", records)
    source = tasks.task_source("tfds:clawjax_tiny_tasks/train", data_dir=str(tmp_path / "tfds"))
    assert isinstance(source, tasks.TfdsTaskSource) and len(source) == 12
    by_id = {t["task_id"]: t for t in (source[i] for i in range(len(source)))}
    assert by_id["tf-3"] == {"task_id": "tf-3", "env": "homework", "seed": 3, "preference": "final_only"}
    assert by_id["tf-4"] == {"task_id": "tf-4", "env": "homework", "seed": 4}
    assert type(by_id["tf-4"]["seed"]) is int
    assert sorted(by_id) == sorted(f"tf-{i}" for i in range(12))
    test_split = tasks.task_source("tfds:clawjax_tiny_tasks/test", data_dir=str(tmp_path / "tfds"))
    assert sorted(ids(test_split[i] for i in range(4))) == [f"tf-{i}" for i in range(12, 16)]

    shards = [ids(tasks.TaskStream(source, seed=1, shard_index=i, shard_count=3, num_epochs=1))
              for i in range(3)]
    assert sorted(t for s in shards for t in s) == sorted(by_id)
    stream = tasks.TaskStream(source, seed=1)
    stream.take(5)
    state = stream.get_state()
    tail = ids(stream.take(10))
    again = tasks.TaskStream(tasks.tfds_task_source("clawjax_tiny_tasks", "train", str(tmp_path / "tfds")), seed=1)
    again.set_state(state)
    assert ids(again.take(10)) == tail
    assert env_for_task(by_id["tf-3"]).reset(by_id["tf-3"]).role == "user"


def test_tfds_records_are_checked():
    class Fake:
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    source = tasks.TfdsTaskSource(Fake([{"task_id": b"", "env": b"homework"},
                                        {"task_id": b"x", "task_json": b"[1]"},
                                        {"task_id": b"y", "task_json": b"{oops"},
                                        {"task_id": b"z", "n": np.array([1, 2]), "f": np.float32(0.5)}]),
                                  "fake", "train")
    with pytest.raises(tasks.TaskSourceError, match=r"tfds fake/train\[0\]: field 'task_id' = ''"):
        source[0]
    with pytest.raises(tasks.TaskSourceError, match=r"\[1\]: field 'task_json' = \[1\]"):
        source[1]
    with pytest.raises(tasks.TaskSourceError, match=r"\[2\]: field 'task_json' is not a JSON object"):
        source[2]
    assert source[3] == {"task_id": "z", "n": [1, 2], "f": 0.5}
