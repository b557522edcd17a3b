"""Task prompts for the environments, through a `grain` pipeline: shuffled with a seed, sharded
per rollout worker, checkpointable.

    source = task_source("tasks.jsonl")                     # or "tfds:NAME/SPLIT" (+ data_dir)
    stream = TaskStream(source, seed=0, shard_index=w, shard_count=W)
    task = next(stream)                                     # a dict: {"task_id", "env", ...}
    saved = stream.get_state()                              # bytes (JSON): checkpoint it
    stream = TaskStream(source, seed=0, shard_index=w, shard_count=W); stream.set_state(saved)

A task is a JSON object with a non-empty str "task_id" (unique within a JSONL file) and the
fields its environment reads (`clawjax.rollout.envs`). Sources are grain random-access data
sources (`__len__`, `__getitem__`) with a `repr` that pins their content (a JSONL source
includes a digest of its tasks), so a state saved over a different file is refused.

Sharding: every epoch is one permutation of all tasks (from `seed`, new each epoch), split into
`shard_count` disjoint strided shards that together cover it; worker w reads shard w.

TFDS records are decoded to plain Python: bytes → str, numpy scalars → int/float, arrays →
lists. A record may carry a text feature "task_json" holding a JSON object; its fields are
merged into the task (how nested fields such as a terminal task's "check" travel through TFDS).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterator, Mapping

import grain
import numpy as np


class TaskSourceError(ValueError):
    """A task file or record is malformed; names the file (or dataset), the line or index, the
    field and what was expected."""


def check_task_record(where: str, record: Any) -> dict[str, Any]:
    """A task must be a JSON object with a non-empty str "task_id" (and a str "env" if any)."""
    if not isinstance(record, Mapping):
        raise TaskSourceError(f"{where}: expected a JSON object, got {type(record).__name__}")
    task_id = record.get("task_id")
    if not isinstance(task_id, str) or not task_id:
        raise TaskSourceError(f"{where}: field 'task_id' = {task_id!r}, expected a non-empty str")
    if "env" in record and not isinstance(record["env"], str):
        raise TaskSourceError(f"{where}: field 'env' = {record['env']!r}, expected a str")
    return dict(record)


def read_jsonl_tasks(path: str) -> list[dict[str, Any]]:
    """Reads and checks every non-blank line of a JSONL task file; task ids must be unique."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"tasks = {path!r}: no such file")
    tasks, seen = [], {}
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskSourceError(f"{where}: not a JSON object ({e.msg})") from e
            task = check_task_record(where, record)
            if task["task_id"] in seen:
                raise TaskSourceError(f"{where}: field 'task_id' = {task['task_id']!r} repeats "
                                      f"line {seen[task['task_id']]}, expected unique ids")
            seen[task["task_id"]] = number
            tasks.append(task)
    if not tasks:
        raise TaskSourceError(f"{path}: no tasks")
    return tasks


def write_jsonl_tasks(path: str, tasks: list[Mapping[str, Any]]) -> None:
    with open(path, "w") as f:
        for i, task in enumerate(tasks):
            f.write(json.dumps(check_task_record(f"tasks[{i}]", task), sort_keys=True) + "\n")


class JsonlTaskSource:
    """A grain random-access source over a JSONL task file (read once, held in memory)."""

    def __init__(self, path: str):
        self.path = path
        self.tasks = read_jsonl_tasks(path)
        digest = hashlib.sha256()
        for task in self.tasks:
            digest.update(json.dumps(task, sort_keys=True).encode())
        self.digest = digest.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(self.tasks[index])

    def __repr__(self) -> str:
        return f"JsonlTaskSource(path={os.path.basename(self.path)!r}, records={len(self)}, sha256={self.digest})"


def to_python(value: Any) -> Any:
    """A TFDS value as plain Python: bytes → str, numpy scalars → int/float/bool, arrays → lists,
    dicts recursively."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [to_python(v) for v in value.tolist()] if value.ndim else to_python(value.item())
    if isinstance(value, np.generic):
        return to_python(value.item())
    if isinstance(value, Mapping):
        return {k: to_python(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_python(v) for v in value]
    return value


class TfdsTaskSource:
    """A grain random-access source over a TFDS data source (array_record files), decoding each
    record to a task dict; see the module docstring for "task_json"."""

    def __init__(self, data_source: Any, name: str, split: str):
        self.data_source = data_source
        self.name = name
        self.split = split

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        where = f"tfds {self.name}/{self.split}[{index}]"
        record = to_python(self.data_source[index])
        if not isinstance(record, dict):
            raise TaskSourceError(f"{where}: expected a FeaturesDict record, got {type(record).__name__}")
        if "task_json" in record:
            try:
                extra = json.loads(record.pop("task_json"))
            except (json.JSONDecodeError, TypeError) as e:
                raise TaskSourceError(f"{where}: field 'task_json' is not a JSON object ({e})") from e
            if not isinstance(extra, dict):
                raise TaskSourceError(f"{where}: field 'task_json' = {extra!r}, expected a JSON object")
            record.update(extra)
        return check_task_record(where, record)

    def __repr__(self) -> str:
        return f"TfdsTaskSource(name={self.name!r}, split={self.split!r}, records={len(self)})"


def tfds_task_source(name: str, split: str = "train", data_dir: str | None = None) -> TfdsTaskSource:
    """Opens a prepared TFDS dataset (file_format array_record) as a task source, without
    TensorFlow: `tfds.data_source(name, split=split, data_dir=data_dir)`."""
    import tensorflow_datasets as tfds  # ~1 s to import: only when a TFDS source is asked for

    return TfdsTaskSource(tfds.data_source(name, split=split, data_dir=data_dir), name, split)


def task_source(spec: str, data_dir: str | None = None) -> JsonlTaskSource | TfdsTaskSource:
    """`"PATH.jsonl"` (or `"jsonl:PATH"`) → JsonlTaskSource; `"tfds:NAME[/SPLIT]"` →
    TfdsTaskSource (split defaults to train; `data_dir` is the TFDS data directory)."""
    if spec.startswith("tfds:"):
        name, _, split = spec[len("tfds:"):].partition("/")
        if not name:
            raise TaskSourceError(f"tasks = {spec!r}: expected tfds:NAME[/SPLIT]")
        return tfds_task_source(name, split or "train", data_dir)
    return JsonlTaskSource(spec.removeprefix("jsonl:"))


def task_dataset(source: Any, *, seed: int = 0, shard_index: int = 0, shard_count: int = 1,
                 shuffle: bool = True, num_epochs: int | None = None) -> grain.MapDataset:
    """The grain pipeline of a task source for worker `shard_index` of `shard_count`:

        MapDataset.source(source).shuffle(seed)[shard_index::shard_count].repeat(num_epochs)

    Each epoch is a fresh permutation of all tasks (grain reseeds the shuffle per epoch) split
    into `shard_count` disjoint strided shards that together cover it (sizes differ by at most
    one); every worker computes the same permutation from `seed`. `num_epochs` None: forever.

    (Not `IndexSampler` + `ShardOptions(drop_remainder=False)`: in grain 0.2.18 that drops
    records when the shards are uneven, e.g. 2 of 30 records over 4 shards.)"""
    if isinstance(shard_count, bool) or not isinstance(shard_count, int) or shard_count < 1:
        raise TaskSourceError(f"shard_count = {shard_count!r}, expected an int >= 1")
    if isinstance(shard_index, bool) or not isinstance(shard_index, int) or not 0 <= shard_index < shard_count:
        raise TaskSourceError(f"shard_index = {shard_index!r}, expected an int in [0, {shard_count})")
    if num_epochs is not None and (isinstance(num_epochs, bool) or not isinstance(num_epochs, int)
                                   or num_epochs < 1):
        raise TaskSourceError(f"num_epochs = {num_epochs!r}, expected None or an int >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise TaskSourceError(f"seed = {seed!r}, expected an int in [0, 2**32)")
    if len(source) < shard_count:
        raise TaskSourceError(f"shard_count = {shard_count}: the source {source!r} has only "
                              f"{len(source)} tasks, expected at least one per shard")
    dataset = grain.MapDataset.source(source)
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    return dataset[shard_index::shard_count].repeat(num_epochs)


class TaskStream:
    """An iterator of task dicts over `task_dataset(source, **options)` whose position can be
    saved (`get_state() -> bytes`, JSON) and restored (`set_state(bytes)`) across processes.
    The state pins the source's repr and the options; restoring it into a stream over another
    source, seed, shuffle, sharding or number of epochs raises TaskSourceError naming the field."""

    def __init__(self, source: Any, *, seed: int = 0, shard_index: int = 0, shard_count: int = 1,
                 shuffle: bool = True, num_epochs: int | None = None):
        self.source = source
        self.options = {"seed": seed, "shard_index": shard_index, "shard_count": shard_count,
                        "shuffle": shuffle, "num_epochs": num_epochs}
        self.dataset = task_dataset(source, **self.options)
        self._iterator = iter(self.dataset)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._iterator)

    def take(self, n: int) -> list[dict[str, Any]]:
        """Up to n next tasks (fewer only when a finite number of epochs runs out)."""
        out = []
        while len(out) < n:
            try:
                out.append(next(self._iterator))
            except StopIteration:
                break
        return out

    def _pinned(self) -> dict[str, Any]:
        return {"source": repr(self.source), **self.options}

    def get_state(self) -> bytes:
        return json.dumps({"version": 1, **self._pinned(), "grain": self._iterator.get_state()},
                          sort_keys=True).encode()

    def set_state(self, state: bytes | str) -> None:
        """Resumes at a saved position (see the class docstring for what must match)."""
        try:
            saved = json.loads(state)
            position = saved["grain"]
        except (TypeError, ValueError, KeyError) as e:
            raise TaskSourceError(f"state = {state!r:.80}, expected the bytes of TaskStream.get_state()") from e
        for field, value in self._pinned().items():
            if saved.get(field) != value:
                raise TaskSourceError(f"state field {field!r} = {saved.get(field)!r}, expected "
                                      f"{value!r} (this stream's); the state belongs to another stream")
        self._iterator.set_state(position)
