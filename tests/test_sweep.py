"""Tests of ``calculate_metrics.py sweep``: every point equals reconstructing that EMA length with
``reconstruct_phema.py`` and running ``calculate_metrics.py gen`` on the pickle; a sweep killed with
SIGKILL resumes without recomputing finished points; two processes give the one-process results;
and the pure parts (plan, resume keys, table, best setting) against hand-written expectations.

The raw snapshots are tiny EDM2 networks whose weights drift with training time, so that every EMA
length is a different network; the detectors are the small ones of tests/scripts/metrics_detectors.py.
"""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

import calculate_metrics as cm
import dnnlib
import reconstruct_phema
from tests.conftest import REPO_ROOT, assert_ok, assert_one_line_error, subprocess_env
from tests.scripts import metrics_detectors as md
from training import encoders, networks_edm2, sweep, training_loop

EMAS = ["0.050", "0.100", "0.150"]
GNET_STD = "0.030"  # not one of EMAS: guiding a network by itself changes nothing
SWEEP_ARGS = ["--ema", ",".join(EMAS), "--guidance", "1,1.8", "--num", 4, "--batch", 2, "--steps", 3, "--seed", 5]

# ----------------------------------------------------------------------------
# Fixtures: raw snapshots, reference statistics, detectors.


def write_snapshots(folder, num_snapshots=4, step_nimg=4096):
    """Snapshots PREFIX-KIMG-STD.pkl every ``step_nimg`` images, sigma_rel 0.050 and 0.100, weights drifting in time."""
    torch.manual_seed(0)
    net = networks_edm2.Precond(
        img_resolution=8,
        img_channels=3,
        label_dim=0,
        model_channels=8,
        channel_mult=[1],
        num_blocks=1,
        attn_resolutions=[],
    )
    base = [p.detach().clone() for p in net.parameters()]
    drift = [torch.randn(p.shape, generator=torch.Generator().manual_seed(k)) for k, p in enumerate(base)]
    for i in range(1, num_snapshots + 1):
        for std in (0.05, 0.1):
            with torch.no_grad():
                for p, b, d in zip(net.parameters(), base, drift):
                    # Gains at 1 (nonzero output), the rest drifting with time and differently per profile.
                    p.copy_(torch.ones_like(b) if b.ndim == 0 else b + d * (0.3 * i + 2 * std))
            data = dnnlib.EasyDict(
                encoder=encoders.StandardRGBEncoder(),
                dataset_kwargs=dnnlib.EasyDict(class_name="training.dataset.ImageFolderDataset", path="d"),
                loss_fn=training_loop.EDM2Loss(),
                ema=net.eval().requires_grad_(False).half(),
            )
            with open(os.path.join(folder, f"network-snapshot-{i * step_nimg // 1000:07d}-{std:.3f}.pkl"), "wb") as f:
                pickle.dump(data, f)
            net.float()
    return str(folder)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-run")
    snapshots = root / "snapshots"
    snapshots.mkdir()
    write_snapshots(snapshots)
    images = np.random.default_rng(0).integers(0, 256, size=(12, 3, 8, 8), dtype=np.uint8)
    feats = {"fid": md.PoolDetector(), "fd_dinov2": md.ConvDetector(seed=2)}
    stats = {"num_images": 12}
    for metric, det in feats.items():
        with torch.no_grad():
            f = det(torch.from_numpy(images)).double().numpy()
        stats[metric] = dict(mu=f.mean(0), sigma=np.cov(f, rowvar=False))
    ref = root / "ref.pkl"
    cm.save_stats(stats, str(ref), verbose=False)
    return dnnlib.EasyDict(root=root, snapshots=str(snapshots), ref=str(ref))


@pytest.fixture
def detectors(monkeypatch):
    monkeypatch.setattr("training.metrics._detector_cache", {})
    dets = dnnlib.EasyDict(fid=md.PoolDetector(), fd_dinov2=md.ConvDetector(seed=2))
    for metric, det in dets.items():
        cm.register_detector(metric, det)
    return dets


@pytest.fixture
def run_cli(single_process_cli):
    return lambda *args: single_process_cli(cm.cmdline, *args)


def sweep_args(run, outdir):
    args = ["sweep", "--net", run.snapshots, "--gnet", run.snapshots, "--gnet-std", GNET_STD, "--ref", run.ref]
    return args + ["--outdir", outdir] + SWEEP_ARGS


def read_results(outdir):
    return {sweep.point_key(r): r["results"] for r in sweep.read_json_lines(os.path.join(outdir, "sweep.jsonl"))}


def run_script(args, cwd, nproc=None, **env):
    script = str(REPO_ROOT / "tests" / "scripts" / "sweep_run.py")
    if nproc is None:
        cmd = [sys.executable, script] + [str(a) for a in args]
    else:  # the arguments through the environment: torchrun's parser takes --num for an abbreviation of its own
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
        env["SWEEP_ARGV"] = json.dumps([str(a) for a in args])
    return subprocess.run(cmd, env=subprocess_env(**env), cwd=str(cwd), capture_output=True, text=True, timeout=600)


# ----------------------------------------------------------------------------
# End to end.


@pytest.mark.slow
def test_every_point_matches_reconstruct_then_gen(run, detectors, run_cli, tmp_path):
    outdir, saved = tmp_path / "sweep", tmp_path / "saved"
    result = run_cli(*sweep_args(run, outdir), "--save", saved)
    assert_ok(result)
    results = read_results(outdir)
    assert len(results) == 6 and len({r["fid"] for r in results.values()}) == 6  # every point differs
    assert sorted(os.listdir(saved)) == [f"phema-0000016-{e}.pkl" for e in EMAS]

    # Independently: reconstruct_phema.py writes the pickles, then 'gen' on each, guided by the 0.030 profile.
    pkls = tmp_path / "pkls"
    rp = click_testing_invoke(
        reconstruct_phema.main, "--indir", run.snapshots, "--outdir", pkls, "--outstd", ",".join(EMAS)
    )
    assert_ok(rp)
    gnet_dir = tmp_path / "gnet"
    rp = click_testing_invoke(
        reconstruct_phema.main, "--indir", run.snapshots, "--outdir", gnet_dir, "--outstd", GNET_STD
    )
    assert_ok(rp)
    gnet = gnet_dir / f"phema-0000016-{GNET_STD}.pkl"
    for ema in EMAS:
        for guidance in (1, 1.8):
            out = tmp_path / f"gen-{ema}-{guidance}.jsonl"
            args = ["gen", "--net", pkls / f"phema-0000016-{ema}.pkl", "--ref", run.ref, "--num", 4, "--batch", 2]
            args += ["--steps", 3, "--seed", 5, "--guidance", guidance, "--gnet", gnet, "--out", out]
            assert_ok(run_cli(*args))
            expected = json.loads(out.read_text().splitlines()[0])["results"]
            key = sweep.point_key(dict(ema=float(ema), guidance=guidance, interval=None))
            assert results[key] == expected  # the same images and statistics: equal to the last bit

    # The table and the best setting per metric, as printed.
    for metric in ("fid", "fd_dinov2"):
        key, best = min(results.items(), key=lambda kv: kv[1][metric])
        assert f"Best {metric} = {best[metric]:.6g} at ema {json.loads(key)[0]:.3f}" in result.stdout
    png = PIL.Image.open(outdir / "sweep.png")
    assert png.size[0] > 600 and png.size[1] > 300

    # A rerun finds every point finished: nothing is evaluated again, the same table.
    calls = detectors.fd_dinov2.calls
    again = run_cli(*sweep_args(run, outdir))
    assert_ok(again)
    assert "6 finished" in again.stdout and again.stdout.splitlines()[-10:] == result.stdout.splitlines()[-10:]
    assert detectors.fd_dinov2.calls == calls
    assert len(sweep.read_json_lines(str(outdir / "sweep.jsonl"))) == 6


def click_testing_invoke(command, *args):
    import click.testing

    return click.testing.CliRunner().invoke(command, [str(a) for a in args])


@pytest.mark.slow
def test_killed_sweep_resumes_without_recomputing(run, tmp_path):
    outdir, counts = tmp_path / "sweep", tmp_path / "counts.txt"
    killed = run_script(sweep_args(run, outdir), tmp_path, SWEEP_COUNT_FILE=str(counts), SWEEP_KILL_AFTER="2")
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert len(read_results(outdir)) == 2 and counts.read_text().count("\n") == 2
    counts.unlink()
    resumed = run_script(sweep_args(run, outdir), tmp_path, SWEEP_COUNT_FILE=str(counts))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "6 combinations, 2 finished" in resumed.stdout
    assert counts.read_text().count("\n") == 4  # only the unfinished points
    assert len(sweep.read_json_lines(str(outdir / "sweep.jsonl"))) == 6

    # The resumed results are those of one uninterrupted sweep.
    whole = run_script(sweep_args(run, tmp_path / "whole"), tmp_path)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert read_results(outdir) == read_results(tmp_path / "whole")


@pytest.mark.slow
def test_two_processes_give_the_one_process_results(run, tmp_path):
    one = run_script(sweep_args(run, tmp_path / "one"), tmp_path)
    assert one.returncode == 0, one.stdout + one.stderr
    counts = tmp_path / "counts.txt"
    two = run_script(sweep_args(run, tmp_path / "two"), tmp_path, nproc=2, SWEEP_COUNT_FILE=str(counts))
    assert two.returncode == 0, two.stdout + two.stderr
    assert sorted(counts.read_text().split()) == ["0"] * 6 + ["1"] * 6  # both processes evaluate every point
    assert read_results(tmp_path / "two") == read_results(tmp_path / "one")
    assert len(sweep.read_json_lines(str(tmp_path / "two" / "sweep.jsonl"))) == 6  # rank 0 the only writer


# ----------------------------------------------------------------------------
# Bad input: one line, before any work.


def test_bad_options_fail_before_any_work(run, detectors, run_cli, tmp_path):
    base = ["sweep", "--ref", run.ref, "--outdir", tmp_path / "out", "--num", 4]
    result = run_cli(*base, "--net", run.snapshots)
    assert_one_line_error(result, "--ema")
    result = run_cli(*base, "--net", run.snapshots, "--ema", "0.1", "--guidance", "1,2")
    assert_one_line_error(result, "--gnet")
    result = run_cli(*base, "--net", run.snapshots, "--ema", "0.1", "--guidance", "2", "--gnet", run.snapshots)
    assert_one_line_error(result, "--gnet-std")
    result = run_cli(*base, "--net", tmp_path, "--ema", "0.1")
    assert_one_line_error(result, "No raw snapshots")
    result = run_cli(*base, "--net", run.snapshots, "--ema", "0.1,0.3")
    assert_one_line_error(result, "--ema", "outside")
    assert detectors.fd_dinov2.calls == 0 and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------
# The pure parts.


def test_plan_keys_table_and_best(tmp_path):
    points = sweep.plan_sweep([0.05, 0.1], [1, 2], [None, (0.3, 2.9)])
    # Guidance 1 is one point whatever the intervals; EMA lengths outermost.
    assert [(p.ema, p.guidance, p.interval) for p in points] == [
        (0.05, 1.0, None), (0.05, 2.0, None), (0.05, 2.0, [0.3, 2.9]),
        (0.1, 1.0, None), (0.1, 2.0, None), (0.1, 2.0, [0.3, 2.9]),
    ]  # fmt: skip
    path = str(tmp_path / "sweep.jsonl")
    settings = dict(net="x", num_images=4)
    fids = [5.0, 3.0, 4.0, 6.0, 2.5, 7.0]
    for p, fid in zip(points, fids):
        sweep.append_json_line(path, dict(p, results=dict(fid=fid, fd_dinov2=10 - fid), settings=settings))
    sweep.append_json_line(path, dict(points[0], results=dict(fid=0.1), settings=dict(settings, num_images=8)))
    done = sweep.finished_results(path, settings)
    assert sorted(done) == sorted(sweep.point_key(p) for p in points)  # other settings do not count
    assert done[sweep.point_key(points[0])]["results"]["fid"] == 5.0
    records = [done[sweep.point_key(p)] for p in points]
    best = sweep.best_settings(records, ["fid", "fd_dinov2"])
    assert (best["fid"]["ema"], best["fid"]["guidance"]) == (0.1, 2.0)
    assert (best["fd_dinov2"]["ema"], best["fd_dinov2"]["interval"]) == (0.1, [0.3, 2.9])
    table = sweep.format_table(records, ["fid", "fd_dinov2"])
    assert "Best fid = 2.5 at ema 0.100, guidance 2" in table
    assert "Best fd_dinov2 = 3 at ema 0.100, guidance 2, interval [0.3, 2.9]" in table
    png = sweep.plot_sweep(records, ["fid", "fd_dinov2"], str(tmp_path / "sweep.png"))
    assert PIL.Image.open(png).size == (1100, 420)
    assert sweep.parse_float_list("1,1.5,1") == [1.0, 1.5]
    assert sweep.parse_interval_choice("all") is None and sweep.parse_interval_choice("0.3,2.9") == (0.3, 2.9)
    with pytest.raises(ValueError, match="not a number"):
        sweep.parse_float_list("1,x")
