"""Multi-host training on one machine: 2 processes × 4 CPU devices (jax.distributed with a local
coordinator, gloo collectives) against 1 process × 8 devices.

- one `TrainLoop` step (2 accumulated micro-batches) from a replay file gives the same
  parameters (≤ 1e-5) whether one process packs all 8 samples or each of two packs its own 4
  (process i takes every 2nd sample); only process 0's samples carry teacher top-K (automatic
  K, `rollout.teacher_topk` = 0), so the processes must agree to pack the top-K fields;
- the checkpoint the 2-process run wrote collectively restores in a 1-process run, bit for bit,
  with the replay position of the whole step;
- a process that dies stops the other with the coordination service's message (no hang);
- (in-process) the processes' replay shares checkpoint one stream state, so samples a process
  gave back or had not reached yet are trained once after a resume, by any process count.

Each run is a fresh Python process (`python tests/test_multihost.py MODE ...`): the device count
and jax.distributed are fixed at start-up.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


# ---------------------------------------------------------------------------- worker side
def _config(workdir: str, replay: str, steps: int = 1):
    sys.path.insert(0, ROOT)
    from configs.tiny_cpu import get_config

    c = get_config()
    c.workdir, c.replay = workdir, replay
    c.trainer.steps, c.trainer.samples_per_step = steps, 8
    c.trainer.micro_batches = 2  # each process's rows split into 2 accumulated micro-batches
    c.trainer.progress = False
    c.checkpoint.async_save = False
    c.distributed.initialization_timeout_s = 60
    c.distributed.heartbeat_timeout_s = 5
    return c


def _host_params(params) -> dict[str, np.ndarray]:
    """Every parameter as a full host array (gathered across processes), keyed by path."""
    import jax
    from jax.experimental import multihost_utils

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    out = {}
    for path, x in flat:
        if jax.process_count() > 1:
            x = multihost_utils.process_allgather(x, tiled=True)
        out[jax.tree_util.keystr(path)] = np.asarray(x, np.float64)
    return out


def _train(workdir, replay, out, coordinator="", num_processes=-1, process_id=-1, die=False):
    from clawjax import distributed

    config = _config(workdir, replay)
    config.loss.topk_coef = 0.1  # the top-K term on (K from the samples: rollout.teacher_topk 0)
    config.distributed.coordinator_address = coordinator
    config.distributed.num_processes, config.distributed.process_id = num_processes, process_id
    distributed.maybe_initialize(config)
    import jax
    from clawjax.loop import TrainLoop

    loop = TrainLoop(config)
    if die and jax.process_index() == 1:
        os._exit(3)  # dies without a word, in the middle of the job
    before = _host_params(loop.state.params)
    in_hand = []  # after each step: the trained ids a redelivery of would be skipped
    train_step = loop.train_step

    def recording(samples):
        metrics = train_step(samples)
        in_hand.append(len(loop._in_hand))
        return metrics
    loop.train_step = recording
    loop.run()
    loop.close()
    after = _host_params(loop.state.params)
    if jax.process_index() == 0:
        np.savez(out, **{f"before{k}": v for k, v in before.items()},
                 **{f"after{k}": v for k, v in after.items()})
    print(json.dumps({"process": jax.process_index(), "of": jax.process_count(),
                      "devices": jax.device_count(), "local": jax.local_device_count(),
                      "in_hand": in_hand}))


def _restore(workdir, replay, out):
    config = _config(workdir, replay)
    config.trainer.resume = True
    from clawjax.loop import TrainLoop

    loop = TrainLoop(config)
    np.savez(out, **_host_params(loop.state.params))
    print(json.dumps({"step": loop.step, "position": loop.source.state()["position"]}))
    loop.close()


def _worker(argv):
    mode = argv[0]
    if mode == "train":
        _train(*argv[1:4])
    elif mode in ("train_mp", "die"):
        workdir, replay, out, coordinator, process_id = argv[1:6]
        _train(workdir, replay, out, coordinator, 2, int(process_id), die=mode == "die")
    elif mode == "restore":
        _restore(*argv[1:4])


# ---------------------------------------------------------------------------- test side
def _env(devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args, devices):
    return subprocess.Popen([sys.executable, __file__, *args], cwd=ROOT, env=_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs, timeout=300):
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a multi-host worker hung past the test's limit")
        results.append((p.returncode, out, err))
    return results


def _checkpoint_meta(workdir: str, step: int) -> dict:
    """The JSON meta of checkpoint `step` as orbax wrote it (read straight from disk)."""
    import glob

    found = [p for p in glob.glob(os.path.join(workdir, "checkpoints", str(step), "meta", "*"))
             if os.path.isfile(p) and not os.path.basename(p).startswith("_")]
    assert found, os.listdir(os.path.join(workdir, "checkpoints", str(step)))
    with open(found[0]) as f:
        return json.load(f)


TOPK = 4


def _with_topk(samples, every: int = 2):
    """`samples` with teacher top-K (K = `TOPK`) on every `every`-th one, from the first (OPD
    samples: `make_samples(opd_every=every)`): with 2 processes and `every` 2, process 0's
    lane only (stream positions 0, 2, 4, …)."""
    rng = np.random.default_rng(0)
    for s in samples[::every]:
        s.teacher_topk_logp = np.full((s.response_len, TOPK), np.log(0.1), np.float32)
        s.teacher_topk_ids = np.stack([rng.choice(500, TOPK, replace=False)
                                       for _ in range(s.response_len)]).astype(np.int32)
        s.validate(vocab_size=512)
    return samples


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs the 2-process step, then (one process) the 8-device reference step and the restore.
    Only process 0's share of the step carries teacher top-K (`_with_topk`)."""
    from sample_factory import make_samples

    from clawjax.sources import write_replay

    tmp = tmp_path_factory.mktemp("multihost")
    replay = str(tmp / "replay.jsonl")
    write_replay(replay, _with_topk(make_samples(16, seed=7, max_len=40, opd_every=2)))
    coordinator = f"127.0.0.1:{_free_port()}"
    mp = _finish([_spawn(["train_mp", str(tmp / "mp"), replay, str(tmp / "mp.npz"), coordinator,
                          str(i)], devices=4) for i in range(2)])
    for rc, out, err in mp:
        assert rc == 0, err[-3000:]
    single = _finish([_spawn(["train", str(tmp / "one"), replay, str(tmp / "one.npz")], 8)])
    assert single[0][0] == 0, single[0][2][-3000:]
    restored = _finish([_spawn(["restore", str(tmp / "mp"), replay, str(tmp / "restored.npz")],
                               8)])
    assert restored[0][0] == 0, restored[0][2][-3000:]
    return dict(mp=mp, mp_dir=str(tmp / "mp"), one_dir=str(tmp / "one"),
                mp_params=dict(np.load(tmp / "mp.npz")),
                one_params=dict(np.load(tmp / "one.npz")), restored=restored[0],
                restored_params=dict(np.load(tmp / "restored.npz")))


def _last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def test_two_processes_form_one_runtime(runs):
    infos = sorted((_last_json(out) for _, out, _ in runs["mp"]), key=lambda d: d["process"])
    assert [{k: v for k, v in info.items() if k != "in_hand"} for info in infos] == [
        {"process": i, "of": 2, "devices": 8, "local": 4} for i in range(2)]


def test_each_process_holds_every_process_trained_samples_until_acknowledged(runs):
    """A buffer restart requeues what any process trained and has not acknowledged, and any
    process may lease it: each must skip the other's trained samples too, so after the step
    each holds all 8 ids (its own 4 and the other's), until the checkpoint acknowledges them."""
    infos = [_last_json(out) for _, out, _ in runs["mp"]]
    assert [info["in_hand"] for info in infos] == [[8], [8]], infos


def test_one_step_matches_single_process(runs):
    mp, one = runs["mp_params"], runs["one_params"]
    assert set(mp) == set(one)
    names = [k[len("after"):] for k in mp if k.startswith("after")]
    assert names
    worst, moved = 0.0, 0.0
    for name in names:
        np.testing.assert_array_equal(mp["before" + name], one["before" + name])
        worst = max(worst, float(np.max(np.abs(mp["after" + name] - one["after" + name]))))
        moved = max(moved, float(np.max(np.abs(one["after" + name] - one["before" + name]))))
    print(f"max |params(2 processes) - params(1 process)| after one step = {worst:.3e}")
    assert moved > 1e-4, "the step must change the parameters for the comparison to mean anything"
    assert worst <= TOL


def test_two_process_checkpoint_restores_in_one_process(runs):
    info = _last_json(runs["restored"][1])
    assert info == {"step": 1, "position": 8}  # the whole step's 8 samples, both processes'
    mp = runs["mp_params"]
    for name, value in runs["restored_params"].items():
        np.testing.assert_array_equal(value, mp["after" + name], err_msg=name)


def _first_metrics(workdir, name="metrics.jsonl"):
    with open(os.path.join(workdir, name)) as f:
        return json.loads(f.readline())


def test_the_step_trained_the_top_k_term_of_one_process_share(runs):
    """Process 0's samples carry top-K and process 1's none: both packed the top-K fields (one
    program), and the global step's top-K term is the one-process step's (process 1's masked
    top-K entries add nothing to it)."""
    mp, one = _first_metrics(runs["mp_dir"]), _first_metrics(runs["one_dir"])
    assert one["topk_kl"] > 0.0, one
    np.testing.assert_allclose(mp["topk_kl"], one["topk_kl"], rtol=1e-5)


def test_the_step_metrics_count_the_samples_of_both_processes(runs):
    """Each process trains its own 4 samples; the step's sample metrics (in every process's
    log) are those of all 8, as the one-process run's."""
    one = _first_metrics(runs["one_dir"])
    assert one["samples"] == 8
    keys = ("samples", "tokens", "reward_mean", "opd_share", "staleness_mean", "staleness_max")
    for name in ("metrics.jsonl", "metrics.process1.jsonl"):
        mp = _first_metrics(runs["mp_dir"], name)
        np.testing.assert_allclose([mp[k] for k in keys], [one[k] for k in keys], rtol=1e-12,
                                   err_msg=name)


def test_checkpoint_meta_and_logs_cover_both_processes(runs):
    """The one meta file lists the samples BOTH processes trained (each acknowledges all of them
    after a restart); each process logs to its own files (process 0: metrics.jsonl)."""
    def trained(name):
        with open(os.path.join(runs["mp_dir"], name)) as f:
            return [i for line in f for i in json.loads(line)["sample_ids"]]
    ids0, ids1 = trained("trained.jsonl"), trained("trained.process1.jsonl")
    assert len(ids0) == len(ids1) == 4 and not set(ids0) & set(ids1)
    assert sorted(_checkpoint_meta(runs["mp_dir"], 1)["unacked_ids"]) == sorted(ids0 + ids1)
    for name in ("metrics.jsonl", "metrics.process1.jsonl"):
        with open(os.path.join(runs["mp_dir"], name)) as f:
            assert [json.loads(line)["step"] for line in f] == [1], name


def test_dead_process_stops_the_job_with_a_message(tmp_path):
    from sample_factory import make_samples

    from clawjax.sources import write_replay

    replay = str(tmp_path / "replay.jsonl")
    write_replay(replay, make_samples(16, seed=7, max_len=40))
    coordinator = f"127.0.0.1:{_free_port()}"
    (rc0, _, err0), (rc1, _, _) = _finish(
        [_spawn(["die", str(tmp_path / "w"), replay, str(tmp_path / "x.npz"), coordinator,
                 str(i)], devices=4) for i in range(2)], timeout=240)
    assert rc1 == 3
    assert rc0 != 0, "the surviving process must stop, not finish or hang"
    assert "another task died" in err0 or "stopped sending heartbeats" in err0, err0[-3000:]


# ---------------------------------------------------------------------------- helpers, in-process
def test_detect_cluster_from_the_environment():
    from clawjax.distributed import detect_cluster

    assert detect_cluster({}) is None
    assert detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None  # one task
    assert detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}) == "slurm"
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "w0"}) is None  # a single-host TPU VM
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == "tpu"
    assert detect_cluster({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"}) == "tpu"


def test_maybe_initialize_stays_single_process_without_a_cluster():
    import jax

    from clawjax import distributed
    from clawjax.config import base_config

    config = base_config()
    assert distributed.maybe_initialize(config, environ={}) is False
    config.distributed.enabled = False  # forced off even inside a SLURM job
    assert distributed.maybe_initialize(config, environ={"SLURM_JOB_ID": "1",
                                                         "SLURM_NTASKS": "4"}) is False
    assert not jax.distributed.is_initialized() and jax.process_count() == 1


@pytest.mark.parametrize("key, value, fragment", [
    ("coordinator_address", "localhost", "'host:port'"),
    ("num_processes", -1, "number of processes"),
    ("process_id", 2, "[0, 2)"),
    ("heartbeat_timeout_s", 0, "≥ 1"),
    ("local_device_ids", "0,x", "comma-separated"),
    ("cpu_collectives", "nccl", "'gloo' or 'mpi'"),
])
def test_bad_distributed_values_name_the_key(key, value, fragment):
    from clawjax.config import ConfigError, base_config, validate

    config = base_config()
    config.distributed.coordinator_address = "127.0.0.1:1234"
    config.distributed.num_processes, config.distributed.process_id = 2, 0
    validate(config)
    config.distributed[key] = value
    with pytest.raises(ConfigError, match=f"distributed.{key}") as e:
        validate(config)
    assert fragment in str(e.value)


def test_processes_agree_on_rows_and_top_k_width():
    """`pad_batch` to `common_batch_shape`: the most rows of any process, and the top-K fields
    (masked zeros) on a process whose samples have none; different non-zero K are refused."""
    from sample_factory import make_samples

    from clawjax import distributed
    from clawjax.batch import pack

    plain, = pack(make_samples(3, seed=1, max_len=20), 32)
    assert plain.teacher_topk_logp is None
    rows = plain.tokens.shape[0]
    assert distributed.common_batch_shape([[rows, 0], [rows + 2, TOPK]]) == (rows + 2, TOPK)
    assert distributed.common_batch_shape([[rows, 0], [1, 0]]) == (rows, 0)
    grown = distributed.pad_batch(plain, rows + 2, TOPK)
    assert grown.teacher_topk_logp.shape == grown.teacher_topk_ids.shape == (rows + 2, 32, TOPK)
    assert grown.teacher_topk_mask.shape == (rows + 2, 32) and not grown.teacher_topk_mask.any()
    assert not grown.teacher_topk_logp.any() and grown.teacher_topk_ids.dtype == np.int32
    assert not grown.segment_ids[rows:].any() and grown.sample_ids[rows:] == ((), ())
    np.testing.assert_array_equal(grown.tokens[:rows], plain.tokens)
    topk, = pack(_with_topk(make_samples(3, seed=1, max_len=20, opd_every=1), every=1), 32)
    assert distributed.pad_batch(topk, rows, TOPK) is topk  # the agreed shape already
    assert distributed.pad_batch(plain, rows, 0) is plain
    with pytest.raises(distributed.DistributedError, match="rollout.teacher_topk") as e:
        distributed.common_batch_shape([[2, 4], [2, 0], [2, 8]])
    assert "[4, 0, 8]" in str(e.value)


def _shares(path: str, n: int):
    """n processes' `ProcessShardReplay`s of one file, in one Python process: `state()`'s
    collective is each share's `local_state()`, in process order."""
    from clawjax import distributed
    from clawjax.sources import ReplaySource

    shares: list = []
    gather = lambda _: [s.local_state() for s in shares]  # noqa: E731
    shares += [distributed.ProcessShardReplay(ReplaySource(path), i, n, gather=gather)
               for i in range(n)]
    return shares


def test_process_shares_of_a_replay_cover_the_step_once(tmp_path):
    from sample_factory import make_samples

    from clawjax import distributed
    from clawjax.sources import ReplaySource, write_replay

    path = str(tmp_path / "r.jsonl")
    write_replay(path, make_samples(10, seed=1))
    one = ReplaySource(path).take(8)
    shares = _shares(path, 2)
    taken = [s.take(4) for s in shares]
    assert sorted(x.sample_id for t in taken for x in t) == sorted(x.sample_id for x in one)
    assert [x.sample_id for x in taken[1]] == [x.sample_id for x in one[1::2]]
    assert all(s.state()["position"] == 8 and "released" not in s.state()
               for s in shares)  # the global position
    assert distributed.local_share(16, 4) == 4
    with pytest.raises(distributed.DistributedError, match="samples_per_step = 10"):
        distributed.local_share(10, 4)


@pytest.mark.parametrize("resume_processes", [1, 2, 3])
def test_shares_that_drift_and_give_back_resume_with_each_sample_once(tmp_path,
                                                                      resume_processes):
    """Process 0 takes 3 more samples than process 1 (it dropped some) and both give samples
    back (a stop in the middle of a step); the checkpointed state, restored by 1, 2 or 3
    processes, delivers every sample not consumed exactly once in the rest of the file's pass
    (each process's lane: its share of the given-back samples, then its share of the file from
    the furthest position any process reached)."""
    from sample_factory import make_samples

    from clawjax.sources import ReplaySource, write_replay

    path = str(tmp_path / "r.jsonl")
    samples = make_samples(42, seed=2)  # a multiple of 1, 2 and 3 processes
    write_replay(path, samples)
    p0, p1 = _shares(path, 2)
    first0, first1 = p0.take(4) + p0.take(3), p1.take(4)
    p0.release(first0[-2:])  # taken, never trained
    p1.release(first1[1:3])
    assert p0.take(1) == [first0[-2]]  # a process takes what it gave back first
    p0.release([first0[-2]])
    consumed = [s.sample_id for s in first0[:-2] + first1[:1] + first1[3:]]
    state = p0.state()
    assert p1.state() == state  # every process checkpoints the same stream state
    later = _shares(path, resume_processes)
    for share in later:
        share.restore(state)
    not_consumed = {s.sample_id for s in samples} - set(consumed)
    assert len(not_consumed) == 42 - len(consumed)
    delivered: list[str] = []
    for share in later:  # each process's lane up to the file's end: released, then fresh
        rest_of_pass = len(share.released) + len(range(share.position + share.index, 42,
                                                       resume_processes))
        delivered += [s.sample_id for s in share.take(rest_of_pass)]
    assert sorted(delivered) == sorted(not_consumed)  # each once, none lost
    if resume_processes == 1:  # what a one-process run (a plain ReplaySource) resumes to
        plain = ReplaySource(path)
        plain.restore(state)
        assert [s.sample_id for s in plain.take(len(delivered))] == delivered


def test_a_process_passes_behind_owes_only_its_lanes_last_pass(tmp_path):
    """Process 0 runs 3½ passes of a 6-sample file ahead of process 1 (it dropped many
    samples): the merged state owes process 1's lane its last pass only, each of its file
    indices once, not one entry per position it fell behind (a list that grew with every
    step's drops); what it gave back stays owed as well."""
    from sample_factory import make_samples

    from clawjax import distributed
    from clawjax.sources import write_replay

    path = str(tmp_path / "r.jsonl")
    write_replay(path, make_samples(6, seed=5))
    p0, p1 = _shares(path, 2)
    given = p1.take(1)
    p1.release(given)                            # lane 1 gave back file index 1
    for _ in range(21):                          # 21 × 2 positions: 3.5 passes
        p0.take(1)
    state = p0.state()
    assert state["position"] == 42
    lane1 = [1, 3, 5]                            # positions ≡ 1 (mod 2) of a 6-sample file
    assert state["released"][0] == 1 and sorted(state["released"][1:]) == lane1
    far = distributed.merge_shard_states(     # 166 passes behind: still one pass owed
        [{"position": 1000, "released": []}, {"position": 2, "released": [1]}], 6)
    assert far["position"] == 1000
    assert far["released"][0] == 1 and sorted(far["released"][1:]) == lane1
    near = distributed.merge_shard_states(    # less than a pass behind: every position owed
        [{"position": 8, "released": []}, {"position": 2, "released": []}], 6)
    assert near == {"position": 8, "released": [3, 5, 1]}


def test_shares_of_a_file_smaller_than_the_global_step_are_refused(tmp_path):
    """trainer.samples_per_step = 4 over 2 processes and a replay file of 3 samples: each
    process's source passes the one-process check (3 ≥ its share of 2: `loop.make_source` runs
    with the process config), but together one step would take 4 positions of a 3-sample file,
    one sample twice (on two processes, where neither process's own repeat check sees it). The
    first take refuses it, on every process alike (they all take their whole share first)."""
    import ml_collections
    from sample_factory import make_samples

    from clawjax import distributed
    from clawjax.config import ConfigError
    from clawjax.loop import make_source
    from clawjax.sources import write_replay

    path = str(tmp_path / "r.jsonl")
    write_replay(path, make_samples(3, seed=3))
    share = distributed.local_share(4, 2)
    local = ml_collections.ConfigDict({"replay": path, "trainer": {"samples_per_step": share}})
    make_source(local, None, str(tmp_path))  # each process's own check passes
    shares = _shares(path, 2)
    for s in shares:
        with pytest.raises(ConfigError, match="replay") as e:
            s.take(share)
        assert "trainer.samples_per_step = 4" in str(e.value) and "holds 3" in str(e.value)
    ok = _shares(path, 3)  # 3 processes × 1: the whole file, each sample once
    assert sorted(x.sample_id for s in ok for x in s.take(1)) == \
        sorted(x.sample_id for x in make_samples(3, seed=3))


def test_shares_of_a_file_not_a_multiple_of_the_process_count_are_refused(tmp_path):
    """5 samples over 2 processes: process i's lane is the stream positions i, i + 2, …, so the
    file's passes split differently (sample 1 is lane 1's in the first pass, lane 0's in the
    second). A process that drops samples runs ahead into the next pass while the other is still
    in this one: here process 0 drops 2 of its first 2 (too long for the budget, say) and takes
    2 more, positions 4 and 6, sample 6 % 5 = 1, which process 1 trains in the same step. No
    sharding keeps both one stream and each sample on one process, so it is refused up front,
    naming replay; 6 samples over 2 (or 3) processes split into fixed lanes and never collide."""
    from sample_factory import make_samples

    from clawjax.config import ConfigError
    from clawjax.sources import write_replay

    path = str(tmp_path / "r.jsonl")
    write_replay(path, make_samples(5, seed=4))
    with pytest.raises(ConfigError, match="replay") as e:
        p0, p1 = _shares(path, 2)
        dropped = p0.take(2)
        trained = {x.sample_id for x in p0.take(2)}, {x.sample_id for x in p1.take(2)}
        assert trained[0].isdisjoint(trained[1]), [x.sample_id for x in dropped]  # collision
    assert "holds 5" in str(e.value) and "multiple of the 2 processes" in str(e.value)
    path6 = str(tmp_path / "r6.jsonl")
    write_replay(path6, make_samples(6, seed=4))
    for n in (2, 3):
        shares = _shares(path6, n)
        shares[0].take(2)  # process 0 drops 2 and runs ahead by a whole lane step
        for _ in range(3):  # three steps of 1 per process: the lanes never share a sample
            step = [{x.sample_id for x in s.take(1)} for s in shares]
            assert len(set().union(*step)) == n


def test_given_back_samples_resume_on_the_process_whose_lane_holds_them(tmp_path):
    """A checkpoint's given-back file indices are delivered, after a resume by n processes, each
    by the process whose lane holds that file index, not round-robin: here the one-process state
    (position 8, released [5]) of a 6-sample file, resumed by 2 processes, gives sample 5 to
    process 1 (lane 1: positions 9, 11, … = samples 3, 5, 1); process 0 taking it while process 1
    reaches position 11 trains sample 5 twice in one step. Together they deliver what one
    process would (sample 5, then positions 8, 9, 10: samples 2, 3, 4)."""
    from sample_factory import make_samples

    from clawjax.sources import write_replay

    path = str(tmp_path / "r.jsonl")
    samples = make_samples(6, seed=5)
    write_replay(path, samples)
    shares = _shares(path, 2)
    for s in shares:
        s.restore({"position": 8, "released": [5]})
    step = [[x.sample_id for x in s.take(2)] for s in shares]
    assert len(set(step[0]) | set(step[1])) == 4, step
    assert step[1][0] == samples[5].sample_id
    assert sorted(step[0] + step[1]) == sorted(samples[i].sample_id for i in (5, 2, 3, 4))


if __name__ == "__main__":
    _worker(sys.argv[1:])
