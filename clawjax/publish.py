"""`Publisher`: push the policy to the serving fleet every `publish.every_steps` training steps.

    pub = Publisher(fleet_or_urls, "runs/x/publish", every_steps=4, keep=3,
                    tokenizer_dir="runs/x/model")
    for step ...:
        ...optimizer step...
        pub.maybe_publish(step, (graphdef, params), config, policy_version)   # returns at once
    pub.close(wait=True)

`maybe_publish` only snapshots the parameters (an on-device copy cast to `dtype`, so the
trainer may donate or overwrite its buffers right away; on multi-host runs the all-gather is a
collective every process joins) and hands the snapshot to a background thread, which on process 0:
  1. copies it to host and writes an HF directory (safetensors in `dtype`, bfloat16 by default,
     config.json, and the tokenizer files of `tokenizer_dir` that SGLang loads) into
     `publish_dir/.staging/`, fsyncs it, and renames it atomically to `publish_dir/v<version>`;
  2. calls `/update_weights_from_disk {model_path, weight_version=str(version)}` on every
     server (a `Fleet`): a server that fails is reported, marked down and retried by the
     fleet's prober (it gets the newest version when it answers again); it never blocks the
     other servers or training;
  3. deletes all but the newest `keep` versions in publish order (`_prune`), also when
     updating the fleet raised (the publish then counts as failed): the versions this
     Publisher wrote, in the order it wrote them, are newer than any it found on disk (left by
     an earlier process: a resumed run publishes lower numbers than a crashed run reached, since
     the version is the step). The version just published, the fleet's target, is never deleted.
A publish due while one is running is coalesced: the newest snapshot waits in a single pending
slot, an older pending one is dropped, counted (`stats()["coalesced"]`) and its `on_drop` called.
A crash at any point leaves every `publish_dir/v*` complete (staging dirs are removed on the
next start; a write that fails removes its own at once).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clawjax import publish_snapshot
from clawjax.durable import fsync_dir

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "generation_config.json")
_VERSION_DIR = re.compile(r"^v(\d+)$")


def list_versions(publish_dir: str | os.PathLike) -> list[int]:
    """Published versions in `publish_dir`, ascending."""
    root = Path(publish_dir)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir()
                  if p.is_dir() and (m := _VERSION_DIR.match(p.name)))


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


@dataclass
class _Job:
    """One scheduled publish. `check` (publisher thread, before writing) may veto it; `on_drop`
    is called instead when it is dropped unpublished without being checked."""
    step: int
    graphdef: Any
    snapshot: tuple
    config: Any
    version: int
    check: Callable[[], bool] | None = None
    on_drop: Callable[[], None] | None = None


class Publisher:
    """Args:
      fleet_or_urls: a list of server URLs (a private `SyncFleet` is made), a `SyncFleet`, an
        async `Fleet` already started on another thread's loop, or None (write only).
      publish_dir: where `v<version>` directories go. every_steps: publish when
        `step % every_steps == 0` (<= 0: never). keep: versions kept on disk (>= 1), the newest
        in publish order (`_by_age`).
      dtype: safetensors dtype. tokenizer_dir: directory whose tokenizer files are copied in.
      fleet_kwargs: passed to the private fleet (timeouts, probe interval).
    """

    def __init__(self, fleet_or_urls, publish_dir: str | os.PathLike, every_steps: int,
                 keep: int = 3, dtype=jnp.bfloat16, tokenizer_dir: str | None = None,
                 fleet_kwargs: dict | None = None):
        if keep < 1:
            raise ValueError(f"keep = {keep}, expected >= 1 (the served version must stay)")
        self.publish_dir = Path(publish_dir)
        self.every_steps = every_steps
        self.keep = keep
        self.dtype = dtype
        self.tokenizer_dir = tokenizer_dir
        self.is_writer = jax.process_index() == 0
        self._fleet, self._owns_fleet = None, False
        if self.is_writer and fleet_or_urls is not None:
            if isinstance(fleet_or_urls, (list, tuple)):
                from clawjax.serving.sync import SyncFleet
                self._fleet = SyncFleet(fleet_or_urls, **(fleet_kwargs or {}))
                self._owns_fleet = True
            else:
                self._fleet = fleet_or_urls
        self._staging = self.publish_dir / ".staging"
        self._written: list[int] = []  # versions this Publisher wrote, oldest first (`_prune`)
        if self.is_writer:
            self.publish_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self._staging, ignore_errors=True)  # leftovers of a crash
            self._staging.mkdir()
        self._cv = threading.Condition()
        self._pending: tuple | None = None
        self._busy = False
        self._closed = False
        self._stats: dict[str, Any] = {
            "published": 0, "coalesced": 0, "gated_out": 0, "failed": 0,
            "server_update_failures": 0,
            "last_version": None, "last_step": None, "last_bytes": 0, "last_write_s": 0.0,
            "last_update_s": 0.0, "last_total_s": 0.0, "last_error": None,
            "last_update_results": {}}
        self._thread = threading.Thread(target=self._worker, daemon=True, name="clawjax-publish")
        if self.is_writer:
            self._thread.start()

    # --- trainer side ------------------------------------------------------------------------
    def maybe_publish(self, step: int, model_or_state, config, policy_version: int,
                      force: bool = False, check: Callable[[], bool] | None = None,
                      on_drop: Callable[[], None] | None = None) -> bool:
        """Schedules a publish of `model_or_state` (an nnx model or `(graphdef, params)`) as
        `v<policy_version>` when `step` is due (or `force`). Returns whether one was scheduled;
        never waits for disk or servers. `check`, when given, is called in the publisher thread
        before anything is written: False drops this publish (counted as `gated_out`); a
        publish coalesced away by a newer one (or discarded by `close(wait=False)`) is never
        checked: its `on_drop` is called instead, in the thread that replaced or discarded it.
        Every scheduled publish gets exactly one of `check` and `on_drop` called, unless the
        publisher thread fails before checking it."""
        if not force and (self.every_steps <= 0 or step % self.every_steps != 0):
            return False
        if isinstance(model_or_state, tuple):
            graphdef, params = model_or_state[0], model_or_state[1]
        else:
            graphdef, params = nnx.split(model_or_state, nnx.Param)
        snapshot = publish_snapshot.take(params, config, self.dtype)
        if not self.is_writer:
            return True
        job = _Job(step, graphdef, snapshot, config, int(policy_version), check, on_drop)
        with self._cv:
            if self._closed:
                raise RuntimeError("Publisher is closed")
            replaced, self._pending = self._pending, job
            if replaced is not None:
                self._stats["coalesced"] += 1
            self._cv.notify_all()
        _dropped(replaced)
        return True

    def stats(self) -> dict:
        with self._cv:
            out = dict(self._stats)
            out["in_flight"] = self._busy
            out["pending"] = self._pending is not None
        out["versions_on_disk"] = list_versions(self.publish_dir)
        if self._fleet is not None and hasattr(self._fleet, "stats"):
            out["fleet"] = self._fleet.stats()
        return out

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until nothing is running or pending; returns False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._busy or self._pending is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self, wait: bool = True) -> None:
        """Stops the publisher; with `wait`, the running and pending publishes finish first."""
        if wait and self.is_writer:
            self.wait()
        discarded = None
        with self._cv:
            self._closed = True
            if not wait:
                discarded, self._pending = self._pending, None
            self._cv.notify_all()
        _dropped(discarded)
        if self._thread.is_alive():
            self._thread.join(timeout=None if wait else 5)
        if self._owns_fleet:
            self._fleet.close()

    # --- background ----------------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            with self._cv:
                while self._pending is None and not self._closed:
                    self._cv.wait()
                if self._pending is None:
                    return
                job, self._pending = self._pending, None
                self._busy = True
            try:
                self._publish(job)
            except Exception as e:  # noqa: BLE001 - reported in stats; training goes on
                log.exception("publish of version %s failed", job.version)
                with self._cv:
                    self._stats["failed"] += 1
                    self._stats["last_error"] = f"v{job.version}: {e!r}"
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _publish(self, job: _Job) -> None:
        if job.check is not None and not job.check():
            with self._cv:
                self._stats["gated_out"] += 1
            return
        step, version = job.step, job.version
        t0 = time.perf_counter()
        path = self.write_version(
            lambda staging: publish_snapshot.write(job.snapshot, job.graphdef, job.config, staging,
                                            self.dtype),
            version)
        job.snapshot = None  # the device copies can go
        nbytes = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        t1 = time.perf_counter()
        try:
            results = self._update_servers(str(path), str(version))
            t2 = time.perf_counter()
        finally:  # also when updating the fleet failed: else every publish stays on disk
            self._prune()  # keeps the version just written (the newest in publish order)
        failures = sum(not r.get("success") for r in results.values())
        with self._cv:
            self._stats.update(
                published=self._stats["published"] + 1, last_version=version, last_step=step,
                last_bytes=nbytes, last_write_s=t1 - t0, last_update_s=t2 - t1,
                last_total_s=time.perf_counter() - t0, last_update_results=results,
                server_update_failures=self._stats["server_update_failures"] + failures)

    def write_version(self, write_checkpoint: Callable[[Path], None], version: int) -> Path:
        """Writes `v<version>` atomically and returns its path: `write_checkpoint(staging)`
        writes the model files into a fresh staging directory, the tokenizer files are added,
        everything is fsynced, then renamed into place. An existing `v<version>` is replaced
        (moved aside first, then removed). A failed write removes its staging directory and
        re-raises; `v<version>` is then unchanged. The version becomes the newest in publish
        order (`_prune`)."""
        staging = self._staging / f"v{version}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            self._fill_staging(write_checkpoint, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        final = self.publish_dir / f"v{version}"
        if final.exists():
            self._retire(final)
        os.rename(staging, final)
        fsync_dir(self.publish_dir)
        with self._cv:
            self._written = [v for v in self._written if v != version] + [version]
        return final

    def _fill_staging(self, write_checkpoint: Callable[[Path], None], staging: Path) -> None:
        """The model files (`write_checkpoint`), then the tokenizer files, all fsynced."""
        write_checkpoint(staging)
        if self.tokenizer_dir:
            for name in TOKENIZER_FILES:
                src = Path(self.tokenizer_dir) / name
                if src.is_file():
                    shutil.copy2(src, staging / name)
        _fsync_tree(staging)

    def _update_servers(self, path: str, version: str) -> dict[str, dict]:
        if self._fleet is None:
            return {}
        from clawjax.serving.fleet import Fleet
        if isinstance(self._fleet, Fleet):
            from clawjax.serving.sync import run_on
            return run_on(self._fleet, self._fleet.update_weights_from_disk(path, version))
        return self._fleet.update_weights_from_disk(path, version)

    def _prune(self) -> None:
        """Deletes all but the newest `keep` versions in publish order (`_by_age`)."""
        for v in self._by_age()[:-self.keep]:
            self._retire(self.publish_dir / f"v{v}")
        with self._cv:
            on_disk = set(list_versions(self.publish_dir))
            self._written = [v for v in self._written if v in on_disk]

    def _by_age(self) -> list[int]:
        """The versions on disk, oldest first: those this Publisher did not write (an earlier
        process's, by number), then those it wrote in the order it wrote them. Not by number:
        a resumed run publishes lower numbers than the run it resumes may have left, and its
        own are the ones the fleet serves. The last one is the version written last."""
        with self._cv:
            written = list(self._written)
        on_disk = list_versions(self.publish_dir)
        mine = set(written)
        return [v for v in on_disk if v not in mine] + [v for v in written if v in on_disk]

    def _retire(self, version_dir: Path) -> None:
        """Removes a published version without ever leaving it half-deleted under its name:
        one atomic rename into the staging area (cleared at start-up after a crash), then the
        removal."""
        trash = self._staging / f"old-{version_dir.name}-{uuid.uuid4().hex[:8]}"
        os.rename(version_dir, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _dropped(job: _Job | None) -> None:
    """Tells the owner of a publish dropped unchecked (`_Job.on_drop`), if it asked."""
    if job is not None and job.on_drop is not None:
        job.on_drop()


def publisher_from_config(publish, workdir: str | os.PathLike,
                          tokenizer_dir: str | None = None, fleet=None) -> Publisher | None:
    """A Publisher from the `publish` ConfigDict (`every_steps`, `dir`, `urls`, `keep`,
    `dtype`, `api_key_file`), or None when `every_steps` is 0. `dir = ""` means
    `workdir/publish`; `urls` is comma-separated (empty: write only) unless a started `fleet` is
    given; the fleet made for `urls` sends the key in `api_key_file` (if any) as a Bearer token
    with every request, weight updates included."""
    if int(publish.every_steps) <= 0:
        return None
    from clawjax.config import check_publish_keep, read_secret_file

    check_publish_keep(int(publish.keep))  # as config.validate: for a ConfigDict of the caller's
    dtypes = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
    if publish.dtype not in dtypes:
        raise ValueError(f"publish.dtype = {publish.dtype!r}, expected one of {sorted(dtypes)}")
    urls = [u.strip() for u in str(publish.urls or "").split(",") if u.strip()]
    api_key = read_secret_file("publish.api_key_file", publish.get("api_key_file", ""),
                               "the fleet's API key")
    return Publisher(fleet if fleet is not None else (urls or None),
                     publish.dir or Path(workdir) / "publish", int(publish.every_steps),
                     keep=int(publish.keep), dtype=dtypes[publish.dtype],
                     tokenizer_dir=tokenizer_dir,
                     fleet_kwargs={"api_key": api_key} if api_key else None)
