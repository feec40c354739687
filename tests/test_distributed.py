"""Tests for torch_utils.distributed and torch_utils.training_stats: single-process use, checkpoints,
and a two-process run under torchrun with Gloo on the CPU."""

import json
import os
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import dnnlib
from tests.conftest import REPO_ROOT, assert_torchrun_succeeded, subprocess_env
from torch_utils import distributed as dist
from torch_utils import training_stats

# ----------------------------------------------------------------------------
# Two processes under torchrun.


def _samples(rank, interval):
    # Mirrors samples() in tests/scripts/dist_check.py.
    rng = np.random.RandomState(100 * interval + rank)
    return rng.randn(7 + 3 * rank) * (rank + 1) + rank


@pytest.mark.slow
@pytest.mark.multiprocess
def test_torchrun_two_processes_on_cpu(tmp_path):
    outdir = tmp_path / "run"
    resultdir = tmp_path / "results"
    outdir.mkdir()
    resultdir.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO_ROOT / "tests" / "scripts" / "dist_check.py"),
        str(outdir),
        str(resultdir),
    ]
    env = subprocess_env(CUDA_VISIBLE_DEVICES="")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=240)
    output = assert_torchrun_succeeded(proc)
    assert "DONE rank 0" in output and "DONE rank 1" in output
    assert output.count("PRINT0 from rank") == 1 and "PRINT0 from rank 0" in output

    results = [r for rank in (0, 1) for r in json.loads((resultdir / f"rank{rank}.json").read_text())]
    assert len(results) == 4
    by_key = {(r["rank"], r["interval"]): r for r in results}

    # Interval 0: statistics over both ranks' finite samples equal numpy's.
    loss_a = np.concatenate([_samples(0, 0), _samples(1, 0)]).astype(np.float32).astype(np.float64)
    expected0 = {
        "Progress/value": (1, 42.0, 0.0),
        "Loss/a": (loss_a.size, loss_a.mean(), loss_a.std()),
        "Loss/scalar": (2, 1.5, 0.5),
        "Only/rank1": (1, 5.0, 0.0),
    }
    for rank in (0, 1):
        r = by_key[(rank, 0)]
        # Names in first-reported order (rank 0's), then names only another rank reported.
        assert r["names"] == ["Progress/value", "Loss/a", "Loss/scalar", "Only/rank1"]
        assert r["default_names"] == r["names"]
        for name, (num, mean, std) in expected0.items():
            got = r["stats"][name]
            assert got["num"] == num, (rank, name)
            assert got["mean"] == pytest.approx(mean, rel=1e-12, abs=1e-12), (rank, name)
            assert got["std"] == pytest.approx(std, rel=1e-9, abs=1e-12), (rank, name)

    # Interval 1: only the new samples count; names without samples read as empty.
    loss_a1 = _samples(1, 1)
    for rank in (0, 1):
        stats = by_key[(rank, 1)]["stats"]
        assert stats["Loss/a"]["num"] == loss_a1.size
        assert stats["Loss/a"]["mean"] == pytest.approx(loss_a1.mean(), rel=1e-12)
        assert stats["Loss/a"]["std"] == pytest.approx(loss_a1.std(), rel=1e-9)
        assert stats["Loss/scalar"]["num"] == 0 and np.isnan(stats["Loss/scalar"]["mean"])
    assert os.listdir(outdir) == ["training-state-0000001.pt"]


def _torchrun_two_processes(script: str, *args: str, cwd) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = subprocess_env(CUDA_VISIBLE_DEVICES="")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd += [str(REPO_ROOT / "tests" / "scripts" / script), *args]
    return subprocess.run(cmd, env=env, cwd=str(cwd), capture_output=True, text=True, timeout=240)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_processes_exit_cleanly_right_after_their_last_collective(tmp_path):
    # Without destroying the process group first, about one run in five aborted here at exit.
    output = assert_torchrun_succeeded(_torchrun_two_processes("dist_exit.py", "collectives", cwd=tmp_path))
    assert "DONE rank 0" in output and "DONE rank 1" in output


@pytest.mark.slow
@pytest.mark.multiprocess
def test_an_error_on_one_rank_does_not_wait_for_the_others(tmp_path):
    proc = _torchrun_two_processes("dist_exit.py", "rank1-fails", cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "rank 1 fails on purpose" in output, output
    assert "rank 0 passed the barrier" not in output  # a barrier at exit would have released it


# ----------------------------------------------------------------------------
# Single process.


_CHECK_AT_EXIT = """
import atexit, os, torch
from torch_utils import distributed as dist

def report():  # registered first, so it runs after the hook that init() registers
    tasks = f"/proc/{os.getpid()}/task"
    names = [open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks)] if os.path.isdir(tasks) else []
    print("initialized:", torch.distributed.is_initialized(), "gloo threads:", sum("gloo" in n for n in names))

atexit.register(report)
dist.init()
torch.distributed.all_reduce(torch.ones(3))
"""


def test_process_group_is_destroyed_at_exit(tmp_path):
    env = subprocess_env(CUDA_VISIBLE_DEVICES="")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK_AT_EXIT], env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "initialized: False gloo threads: 0", proc.stdout + proc.stderr


def test_shutdown_destroys_the_process_group(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    if torch.distributed.is_initialized():
        pytest.skip("another test left a process group")
    dist.init()
    assert torch.distributed.is_initialized()
    dist.shutdown()
    assert not torch.distributed.is_initialized()
    dist.shutdown()  # a no-op without a group
    dist.init()  # a new group after a shutdown
    assert dist.get_world_size() == 1
    dist.shutdown()


def test_single_process_init_without_torchrun(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert not dist.is_distributed()
    was_initialized = torch.distributed.is_initialized()
    try:
        dist.init()
        dist.init()
        assert torch.distributed.is_initialized()
        assert dist.get_rank() == 0 and dist.get_world_size() == 1
        expected = "nccl" if torch.cuda.is_available() else "gloo"
        assert torch.distributed.get_backend() == expected
        t = torch.tensor([2.0, 3.0])
        torch.distributed.all_reduce(t)
        assert t.tolist() == [2.0, 3.0]
        assert not dist.is_distributed()
    finally:
        if not was_initialized and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_rank_helpers_without_process_group(capsys):
    if torch.distributed.is_initialized():
        pytest.skip("another test left a process group")  # never the case in this file's order
    assert dist.get_rank() == 0 and dist.get_world_size() == 1
    dist.print0("hello", 1)
    assert capsys.readouterr().out == "hello 1\n"
    assert dist.should_stop() is False and dist.should_suspend() is False
    dist.update_progress(3, 10)
    dist.request_suspend()
    assert dist.suspend_requested()


# ----------------------------------------------------------------------------
# training_stats, single process.


def test_training_stats_single_process():
    rng = np.random.RandomState(0)
    a = rng.randn(50).astype(np.float32)
    training_stats.report("ts1/a", torch.from_numpy(a[:20]))
    training_stats.report("ts1/a", torch.from_numpy(a[20:]).reshape(5, 6))
    assert training_stats.report("ts1/b", 2.0) == 2.0
    training_stats.report("ts1/b", [4.0, float("nan"), float("-inf")])
    training_stats.report("ts1/c", torch.tensor([]))
    training_stats.report0("ts1/d", 7)
    collector = training_stats.Collector(regex="ts1/.*")
    assert collector.names() == ["ts1/a", "ts1/b", "ts1/c", "ts1/d"]
    collector.update()
    a64 = a.astype(np.float64)
    assert collector.num("ts1/a") == 50
    assert collector.mean("ts1/a") == pytest.approx(a64.mean(), rel=1e-12)
    assert collector.std("ts1/a") == pytest.approx(a64.std(), rel=1e-9)
    assert (collector.num("ts1/b"), collector.mean("ts1/b"), collector.std("ts1/b")) == (2, 3.0, 1.0)
    assert collector.num("ts1/c") == 0 and np.isnan(collector.mean("ts1/c")) and np.isnan(collector.std("ts1/c"))
    assert (collector.num("ts1/d"), collector.mean("ts1/d"), collector.std("ts1/d")) == (1, 7.0, 0.0)
    d = collector.as_dict()
    assert isinstance(d, dnnlib.EasyDict) and list(d) == collector.names()
    assert d["ts1/b"] == dict(num=2, mean=3.0, std=1.0) and d["ts1/b"].mean == 3.0
    assert collector["ts1/d"] == 7.0

    # Next interval: only new samples; keep_previous keeps names that got none.
    training_stats.report("ts1/a", 10.0)
    other = training_stats.Collector(regex="ts1/a", keep_previous=False)
    collector.update()
    assert (collector.num("ts1/a"), collector.mean("ts1/a")) == (1, 10.0)
    assert collector.mean("ts1/b") == 3.0  # kept from the previous interval
    # A collector created later sees everything reported since the start on its first update.
    other.update()
    assert other.names() == ["ts1/a"] and other.num("ts1/a") == 51
    other.update()
    assert other.num("ts1/a") == 0 and np.isnan(other.mean("ts1/a"))


def test_training_stats_all_non_finite_interval_reads_nan():
    """An interval whose samples are all non-finite (a diverged loss) reads as NaN, as in the
    reference, not as the previous interval's value; an interval without samples keeps it."""
    collector = training_stats.Collector(regex="ts5/.*")
    training_stats.report("ts5/loss", [1.0, 3.0])
    collector.update()
    assert collector.mean("ts5/loss") == 2.0
    training_stats.report("ts5/loss", torch.full([4], float("nan")))
    training_stats.report("ts5/loss", float("inf"))
    collector.update()
    assert (
        collector.num("ts5/loss") == 0 and np.isnan(collector.mean("ts5/loss")) and np.isnan(collector.std("ts5/loss"))
    )
    collector.update()  # nothing reported: keep_previous keeps the (NaN) value
    assert np.isnan(collector.mean("ts5/loss"))
    training_stats.report("ts5/loss", [float("nan"), 5.0])  # some finite samples: their mean
    collector.update()
    assert (collector.num("ts5/loss"), collector.mean("ts5/loss")) == (1, 5.0)


def test_training_stats_reset():
    training_stats.report("ts4/x", 1.0)
    training_stats.default_collector.update()
    assert training_stats.default_collector.mean("ts4/x") == 1.0
    training_stats.reset()
    assert training_stats.default_collector.names() == []
    training_stats.default_collector.update()
    assert training_stats.default_collector.as_dict() == {}
    training_stats.report("ts4/x", 3.0)
    training_stats.default_collector.update()
    assert training_stats.default_collector.num("ts4/x") == 1 and training_stats.default_collector.mean("ts4/x") == 3.0


def test_training_stats_regex_is_full_match():
    training_stats.report("ts2/loss", 1.0)
    training_stats.report("ts2/loss_extra", 1.0)
    assert training_stats.Collector(regex="ts2/loss").names() == ["ts2/loss"]
    assert "ts2/loss" in training_stats.default_collector.names()


def test_training_stats_large_values_use_float64():
    collector = training_stats.Collector(regex="ts3/x")
    values = np.array([1e8 + 1, 1e8 + 2, 1e8 + 3], dtype=np.float64)
    training_stats.report("ts3/x", torch.from_numpy(values))
    collector.update()
    assert collector.mean("ts3/x") == pytest.approx(1e8 + 2, abs=1e-6)  # float32 spacing at 1e8 is 8


# ----------------------------------------------------------------------------
# Checkpoints.


class _Plain:
    def __init__(self):
        self.stds = [0.05, 0.1]
        self.count = 3
        self.tensor = torch.arange(4.0)


def _make_objects(seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(8, 4)).square().mean().backward()  # also updates the BatchNorm buffers
    opt.step()
    state = dnnlib.EasyDict(cur_nimg=2048 * (seed + 1), total_elapsed_time=12.5 * (seed + 1))
    plain = _Plain()
    plain.count = seed
    return state, net, opt, plain


def test_checkpoint_round_trip_weights_only(tmp_path):
    state, net, opt, plain = _make_objects(1)
    path = tmp_path / "training-state-0000002.pt"
    dist.CheckpointIO(state=state, net=net, optimizer=opt, ema=plain).save(str(path), verbose=False)
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind
    raw = torch.load(str(path), weights_only=True)  # plain types only, no allow-list needed
    assert type(raw["state"]) is dict and raw["ema"]["stds"] == [0.05, 0.1]

    state2, net2, opt2, plain2 = _make_objects(7)
    dist.CheckpointIO(state=state2, net=net2, optimizer=opt2, ema=plain2).load(str(path), verbose=False)
    assert isinstance(state2, dnnlib.EasyDict) and state2 == state
    for (name, a), (_, b) in zip(net.state_dict().items(), net2.state_dict().items()):
        assert torch.equal(a, b), name
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    for key, s in opt.state_dict()["state"].items():
        for field, value in s.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt2.state_dict()["state"][key][field]))
    assert plain2.count == 1 and plain2.stds == [0.05, 0.1] and torch.equal(plain2.tensor, plain.tensor)


def test_checkpoint_loads_reference_style_easydict(tmp_path):
    _, net, opt, _ = _make_objects(0)
    path = tmp_path / "training-state-0001000.pt"
    # Reference checkpoints pickle `state` as a dnnlib.util.EasyDict.
    torch.save(
        dict(
            state=dnnlib.EasyDict(cur_nimg=1000448, total_elapsed_time=3.0),
            net=net.state_dict(),
            loss_fn=dict(P_mean=-0.4, P_std=1.0, sigma_data=0.5),
            optimizer=opt.state_dict(),
            ema=dict(stds=[0.05], emas=[net.state_dict()]),
        ),
        str(path),
    )
    with pytest.raises(pickle.UnpicklingError):
        torch.load(str(path), weights_only=True)  # the allow-list is what makes this work
    state = dnnlib.EasyDict(cur_nimg=0, total_elapsed_time=0.0)
    loss = types.SimpleNamespace(P_mean=0.0, P_std=0.0, sigma_data=0.0)
    _, net2, opt2, _ = _make_objects(5)
    ema = {}
    dist.CheckpointIO(state=state, net=net2, loss_fn=loss, optimizer=opt2, ema=ema, absent=None).load(
        str(path), verbose=False
    )
    assert state == dict(cur_nimg=1000448, total_elapsed_time=3.0)
    assert (loss.P_mean, loss.P_std, loss.sigma_data) == (-0.4, 1.0, 0.5)
    assert ema["stds"] == [0.05] and torch.equal(net2[0].weight, net[0].weight)


def test_checkpoint_loads_reference_numpy_learning_rate(tmp_path):
    """The reference's learning-rate schedule returns numpy float64, so its checkpoints hold numpy
    scalars (and their dtype) in Adam's param groups: those load, with nothing else allowed."""
    _, net, opt, _ = _make_objects(0)
    for group in opt.param_groups:
        group["lr"] = np.float64(0.0123)
    path = tmp_path / "training-state-0000001.pt"
    torch.save(
        dict(state=dnnlib.EasyDict(cur_nimg=1024, total_elapsed_time=1.0), optimizer=opt.state_dict()), str(path)
    )
    _, _, opt2, _ = _make_objects(3)
    state = dnnlib.EasyDict()
    dist.CheckpointIO(state=state, optimizer=opt2).load(str(path), verbose=False)
    assert state.cur_nimg == 1024 and opt2.param_groups[0]["lr"] == 0.0123


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("case", ["code", "truncated", "not-a-dict"])
def test_checkpoint_that_cannot_be_read_gets_one_line_error(tmp_path, case):
    path = tmp_path / "training-state-0000001.pt"
    marker = tmp_path / "marker"
    if case == "code":
        torch.save(dict(state=_RunsCode(marker)), str(path))
    elif case == "truncated":
        torch.save(dict(state=dict(cur_nimg=1)), str(path))
        path.write_bytes(path.read_bytes()[:100])
    else:
        torch.save([1, 2], str(path))
    with pytest.raises(ValueError) as info:
        dist.CheckpointIO(state={}).load(str(path), verbose=False)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    if case == "code":
        assert "posix.system" in message or "nt.system" in message, message
    assert not marker.exists()  # the payload never ran


def test_load_latest_picks_highest_full_match(tmp_path, capsys):
    ckpt_state = dict(cur_nimg=0)
    io = dist.CheckpointIO(state=ckpt_state)
    assert io.load_latest(str(tmp_path)) is None
    assert io.load_latest(str(tmp_path / "missing")) is None
    for number in (100, 200, 99):
        ckpt_state["cur_nimg"] = number
        io.save(str(tmp_path / f"training-state-{number:07d}.pt"), verbose=False)
    ckpt_state["cur_nimg"] = 12345
    io.save(str(tmp_path / "training-state-0000001.pt"), verbose=False)
    # Decoys that must be ignored: not a full match, not a number, or not a file.
    for name in ("training-state-0000300.pt.tmp", "training-state-abc.pt", "old-training-state-0000400.pt"):
        (tmp_path / name).write_bytes(b"garbage")
    (tmp_path / "training-state-0000500.pt").mkdir()
    ckpt_state["cur_nimg"] = -1
    latest = io.load_latest(str(tmp_path))
    assert latest == str(tmp_path / "training-state-0000200.pt")
    assert ckpt_state["cur_nimg"] == 200
    assert "Loading" in capsys.readouterr().out
