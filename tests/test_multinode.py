"""Two nodes on one machine: ``torchrun --nnodes=2`` twice (node ranks 0 and 1, two processes each,
a c10d rendezvous on 127.0.0.1, Gloo on the CPU) gives what one process gives, for training with
train_edm2.py and for ``calculate_metrics.py gen``. Only global rank 0 prints and writes files."""

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import calculate_metrics as cm
from tests.conftest import REPO_ROOT, assert_torchrun_succeeded, subprocess_env
from tests.scripts import train_helpers
from tests.test_calculate_metrics_cli import (
    block_means,
    numpy_stats,
    printed_metrics,
    random_images,
    tiny_network_pickle,
)
from tests.test_training import compare_nets

TIMEOUT = 240  # seconds for a whole two-node run; a hung rendezvous fails instead of hanging


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = subprocess_env(CUDA_VISIBLE_DEVICES="")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers
        except ProcessLookupError:
            pass
    proc.wait()


def run_one_process(script: str, args: list, cwd) -> str:
    """``python script args`` as one process; its output."""
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / script), *map(str, args)],
        env=_env(),
        cwd=str(cwd),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    return output


def run_two_nodes(script: str, args: list, cwd) -> str:
    """The two torchrun commands of a two-node job (2 x 2 processes), started together; the output
    of both. Both process groups are killed if either fails or the run takes over TIMEOUT seconds."""
    endpoint = f"127.0.0.1:{_free_port()}"
    procs, logs = [], []
    try:
        for node_rank in (0, 1):
            log = open(cwd / f"node{node_rank}.log", "w+")
            logs.append(log)
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node-rank={node_rank}",
                "--nproc-per-node=2",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={endpoint}",
                "--rdzv-id=multinode-test",
                "--",  # torchrun's parser would take e.g. gen's --num for an abbreviation of --numa-binding
                str(REPO_ROOT / script),
                *map(str, args),
            ]
            procs.append(
                subprocess.Popen(
                    cmd, env=_env(), cwd=str(cwd), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
        deadline = time.monotonic() + TIMEOUT
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 1)))
            except subprocess.TimeoutExpired:
                codes.append("timeout")
            if codes[-1] != 0:
                break
    finally:
        for proc in procs:
            _kill(proc)
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    assert codes == [0, 0], f"exit codes {codes}\n" + "\n".join(text[-4000:] for text in outputs)
    for text in outputs:  # and no process crashed on its way out
        assert_torchrun_succeeded(subprocess.CompletedProcess(cmd, 0, text, ""))
    return "\n".join(outputs)


# ----------------------------------------------------------------------------
# Training: the checkpoint, snapshots and statistics of a 4-process run equal a 1-process run's.

TRAIN_ARGS = [
    "--preset=cpu-16",
    "--channels=8",
    "--batch=64",  # 16 images per process
    "--duration=1Ki",
    "--status=256",
    "--snapshot=1Ki",
    "--checkpoint=1Ki",
    "--lr=0.001",
    "--grid=0",
]
TRAIN_SCRIPT = "tests/scripts/train_deterministic.py"  # train_edm2.py with a loss without random draws


@pytest.fixture(scope="module")
def training_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode-train")
    data = train_helpers.random_dataset_zip(str(root / "data.zip"), num_images=40, resolution=8, num_classes=4)
    run_one_process(TRAIN_SCRIPT, [f"--outdir={root / 'one'}", f"--data={data}", *TRAIN_ARGS], root)
    output = run_two_nodes(TRAIN_SCRIPT, [f"--outdir={root / 'two'}", f"--data={data}", *TRAIN_ARGS], root)
    return root / "one", root / "two", output


def _stats(run_dir) -> list:
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def _snapshot_tensors(path) -> list:
    with open(path, "rb") as f:
        ema = pickle.load(f)["ema"]
    return list(ema.parameters()) + list(ema.buffers())


@pytest.mark.slow
def test_two_nodes_train_like_one_process(training_runs):
    one, two, output = training_runs
    assert output.count("Number of processes:     4") == 1

    # The network, its EMAs (float32, in the checkpoint) and the float16 snapshots.
    compare_nets(
        two / "training-state-0000001.pt", one / "training-state-0000001.pt", tol=1e-6
    )  # they differ by ~4e-9: the order of sums
    snapshots = sorted(p.name for p in one.glob("network-snapshot-*.pkl"))
    assert len(snapshots) == 4
    for name in snapshots:
        for a, b in zip(_snapshot_tensors(two / name), _snapshot_tensors(one / name)):
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-3, atol=1e-4)  # a float16 rounding step

    # The comparison is far finer than what training changed: the initial EMA snapshot is the
    # initial network, which moved by ~4e-3 relative (the weights are normalised after every step).
    initial = torch.cat([t.flatten().double() for t in _snapshot_tensors(one / "network-snapshot-0000000-0.100.pkl")])
    final = torch.load(one / "training-state-0000001.pt", weights_only=True)["net"]
    final = torch.cat([t.flatten().double() for t in final.values()])
    assert float((final - initial).norm() / initial.norm()) > 1e-3

    # Statistics that do not measure time or memory are the same.
    stats_one, stats_two = _stats(one), _stats(two)
    kimg = [0.0, 0.256, 0.512, 0.768, 1.024]
    assert [s["Progress/kimg"] for s in stats_two] == [s["Progress/kimg"] for s in stats_one] == kimg
    for a, b in zip(stats_two[1:], stats_one[1:]):
        assert list(a) == list(b)
        for key in ["Loss/loss", "Loss/learning_rate", "Loss/grad_norm"]:
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert stats_one[-1]["Loss/loss"] < stats_one[1]["Loss/loss"]  # it learned something


@pytest.mark.slow
def test_only_global_rank_zero_writes_and_prints(training_runs):
    one, two, output = training_runs

    def names(run_dir):
        return sorted("events.*" if name.startswith("events.") else name for name in os.listdir(run_dir))

    assert names(two) == names(one)  # one TensorBoard file, one log, the same snapshots and checkpoint
    assert "events.*" in names(one) and "training-state-0000001.pt" in names(one)
    log_one, log_two = (one / "log.txt").read_text(), (two / "log.txt").read_text()
    assert log_two.count("Status:") == log_one.count("Status:") == 5
    assert output.count("Setting up training config...") == 1
    assert output.count("Saving network-snapshot-0000001-0.100.pkl") == 1
    assert output.count("training-state-0000001.pt ... done") == 1
    records = json.loads((two / "training_options.json").read_text())
    assert records == json.loads((one / "training_options.json").read_text())


# ----------------------------------------------------------------------------
# calculate_metrics.py gen: the same FID from 4 processes on 2 nodes as from one.


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_nodes_gen_like_one_process(tmp_path):
    net = tiny_network_pickle(tmp_path / "net.pkl")
    ref = tmp_path / "ref.pkl"
    cm.save_stats(
        {"num_images": 10, "fid": numpy_stats(block_means(random_images(10, seed=1)))}, str(ref), verbose=False
    )
    # 6 images in batches of 1 over 4 processes: 8 batches, the last two (on node rank 1's processes) empty.
    args = ["gen", f"--net={net}", f"--ref={ref}", "--metrics=fid", "--num=6", "--seed=7", "--batch=1"]
    script = "tests/scripts/metrics_detectors.py"  # calculate_metrics.py with a small local FID detector
    one = printed_metrics(run_one_process(script, args, tmp_path))
    output = run_two_nodes(script, args, tmp_path)
    two = printed_metrics(output)
    assert output.count("fid = ") == 1  # printed by global rank 0 only
    assert list(one) == ["fid"] and one["fid"] > 0
    assert two == {"fid": pytest.approx(one["fid"], rel=1e-9)}
