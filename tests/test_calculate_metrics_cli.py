"""End-to-end tests of the calculate_metrics.py command line on the CPU: ``ref`` on a dataset ZIP,
``calc`` on a folder of PNGs, ``gen`` on a small network pickle, the same statistics file from
one and two processes (torchrun), and one-line errors for bad input.

Small real detectors (tests/scripts/metrics_detectors.py) are injected through the public
``register_detector``; expected values are computed independently with numpy and the
reference's sqrtm formula.
"""

import io
import json
import pickle
import re
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch

import calculate_metrics as cm
import dnnlib
from tests.conftest import REPO_ROOT, assert_ok, assert_one_line_error, assert_torchrun_succeeded, subprocess_env
from tests.scripts import metrics_detectors as md

# ----------------------------------------------------------------------------
# Helpers and fixtures.


def random_images(num, res=8, seed=0):
    # Smooth-ish images: a random per-image colour plus noise, so the statistics are not degenerate.
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, size=(num, 3, 1, 1))
    return np.clip(base + rng.integers(-40, 41, size=(num, 3, res, res)), 0, 255).astype(np.uint8)


def block_means(images):
    """PoolDetector's features, computed independently (float64)."""
    n, c, h, w = images.shape
    return images.reshape(n, c, 2, h // 2, 2, w // 2).astype(np.float64).mean(axis=(3, 5)).reshape(n, -1)


def numpy_stats(features):
    return dict(mu=features.mean(0), sigma=np.cov(features, rowvar=False))


def reference_fd(a, b):
    """The reference implementation's formula (scipy.linalg.sqrtm)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s, _ = scipy.linalg.sqrtm(a["sigma"] @ b["sigma"], disp=False)
    return float(np.real(np.square(a["mu"] - b["mu"]).sum() + np.trace(a["sigma"] + b["sigma"] - 2 * s)))


def png_bytes(image):
    buf = io.BytesIO()
    PIL.Image.fromarray(image.transpose(1, 2, 0)).save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def write_dataset_zip(path, images):
    """A ZIP in dataset_tool.py's layout: 00000/img00000000.png, ..., dataset.json with null labels."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for i, image in enumerate(images):
            z.writestr(f"{i // 1000:05d}/img{i:08d}.png", png_bytes(image))
        z.writestr("dataset.json", json.dumps({"labels": None}))
    return str(path)


def write_png_folder(folder, images):
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        (folder / f"{i:06d}.png").write_bytes(png_bytes(image))
    return str(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics-data")
    d = dnnlib.EasyDict(zip_images=random_images(10, seed=1), png_images=random_images(14, seed=2))
    d.zip = write_dataset_zip(root / "data.zip", d.zip_images)
    d.pngs = write_png_folder(root / "pngs", d.png_images)
    return d


@pytest.fixture
def detectors(monkeypatch):
    """fid -> PoolDetector (exact features), fd_dinov2 -> ConvDetector (counts its calls)."""
    monkeypatch.setattr("training.metrics._detector_cache", {})
    dets = dnnlib.EasyDict(fid=md.PoolDetector(), fd_dinov2=md.ConvDetector(seed=2))
    for metric, det in dets.items():
        cm.register_detector(metric, det)
    return dets


@pytest.fixture
def run_cli(single_process_cli):
    """Run the command line in this process (see conftest.single_process_cli)."""
    return lambda *args: single_process_cli(cm.cmdline, *args)


def printed_metrics(output):
    return {m: float(v) for m, v in re.findall(r"^(\w+) = (\S+)$", output, flags=re.MULTILINE)}


def subset(num_total, num, seed):
    """The reference's subset rule: a legacy RandomState(seed) shuffle of all indices, the first num, in file order."""
    idx = np.arange(num_total)
    np.random.RandomState(seed % (1 << 31)).shuffle(idx)
    return np.sort(idx[:num])


# ----------------------------------------------------------------------------
# End to end.


def test_ref_then_calc(data, detectors, run_cli, tmp_path):
    # ref on a dataset ZIP: every image, in the dataset_tool layout, equal to numpy's statistics.
    dest = tmp_path / "refs" / "data.pkl"
    result = run_cli("ref", "--data", data.zip, "--dest", dest, "--batch", 4, "--workers", 0)
    assert_ok(result)
    with open(dest, "rb") as f:
        ref = pickle.load(f)
    assert list(ref) == ["num_images", "fid", "fd_dinov2"] and ref["num_images"] == 10
    expected = numpy_stats(block_means(data.zip_images))
    np.testing.assert_allclose(ref["fid"]["mu"], expected["mu"], rtol=1e-13)
    np.testing.assert_allclose(ref["fid"]["sigma"], expected["sigma"], rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        conv_features = md.ConvDetector(seed=2)(torch.from_numpy(data.zip_images)).double().numpy()
    np.testing.assert_allclose(ref["fd_dinov2"]["sigma"], np.cov(conv_features, rowvar=False), rtol=1e-5, atol=1e-8)

    # calc on a folder of PNGs: a seeded random subset of --num images.
    results = {}
    for seed in (3, 4):
        result = run_cli(
            "calc", "--images", data.pngs, "--ref", dest, "--num", 9, "--seed", seed, "--batch", 4, "--workers", 0
        )
        assert_ok(result)
        results[seed] = printed_metrics(result.stdout)
        assert list(results[seed]) == ["fid", "fd_dinov2"]
        stats = numpy_stats(block_means(data.png_images[subset(14, 9, seed)]))
        assert results[seed]["fid"] == pytest.approx(reference_fd(stats, ref["fid"]), rel=1e-5)
    assert results[3] != results[4]


def test_calc_with_worker_processes(data, detectors, run_cli, tmp_path):
    ref = tmp_path / "ref.pkl"
    cm.save_stats({"num_images": 10, "fid": numpy_stats(block_means(data.zip_images))}, str(ref), verbose=False)
    result = run_cli(
        "calc", "--images", data.pngs, "--ref", ref, "--metrics", "fid", "--num", 14, "--batch", 3, "--workers", 2
    )
    assert_ok(result)
    stats = numpy_stats(block_means(data.png_images))
    expected = reference_fd(stats, numpy_stats(block_means(data.zip_images)))
    assert printed_metrics(result.stdout) == {"fid": pytest.approx(expected, rel=1e-5)}
    assert detectors.fd_dinov2.calls == 0  # not asked for


def tiny_network_pickle(path):
    from training.encoders import StandardRGBEncoder
    from training.networks_edm2 import Precond
    from training.training_loop import EDM2Loss

    torch.manual_seed(0)
    net = Precond(
        img_resolution=8,
        img_channels=3,
        label_dim=4,
        model_channels=8,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
    )
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(1.0)  # nonzero output and modulation gains, so the images depend on the net
    data = dnnlib.EasyDict(
        encoder=StandardRGBEncoder(),
        dataset_kwargs=dnnlib.EasyDict(
            class_name="training.dataset.ImageFolderDataset", path="data.zip", use_labels=True
        ),
        loss_fn=EDM2Loss(),
        ema=net.eval().requires_grad_(False).half(),
    )
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return str(path)


@pytest.mark.slow
def test_gen_on_network_pickle(data, detectors, run_cli, tmp_path):
    from generate_images import generate_images

    net = tiny_network_pickle(tmp_path / "net.pkl")
    ref = tmp_path / "ref.pkl"
    cm.save_stats({"num_images": 10, "fid": numpy_stats(block_means(data.zip_images))}, str(ref), verbose=False)
    result = run_cli("gen", "--net", net, "--ref", ref, "--metrics", "fid", "--num", 5, "--seed", 7, "--batch", 2)
    assert_ok(result)

    # The same seeds sampled independently, then numpy statistics and the sqrtm formula.
    images = np.concatenate([r.images.cpu().numpy() for r in generate_images(net, seeds=range(7, 12), verbose=False)])
    assert images.shape == (5, 3, 8, 8) and images.std() > 0
    expected = reference_fd(numpy_stats(block_means(images)), numpy_stats(block_means(data.zip_images)))
    assert printed_metrics(result.stdout) == {"fid": pytest.approx(expected, rel=1e-5)}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_write_the_same_file(data, detectors, run_cli, tmp_path):
    # 5 images in batches of 1 over 2 processes: max(4//2+1, 1)*2 = 6 batches, so rank 1's last is empty.
    images = random_images(5, seed=3)
    zip_path = write_dataset_zip(tmp_path / "five.zip", images)
    one, two = tmp_path / "one.pkl", tmp_path / "two.pkl"
    assert_ok(run_cli("ref", "--data", zip_path, "--dest", one, "--metrics", "fid", "--batch", 1, "--workers", 0))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO_ROOT / "tests" / "scripts" / "metrics_detectors.py"),
        "ref",
        "--data",
        zip_path,
        "--dest",
        str(two),
        "--metrics",
        "fid",
        "--batch",
        "1",
        "--workers",
        "0",
    ]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert_torchrun_succeeded(proc)
    assert two.read_bytes() == one.read_bytes()  # exact features: float64 sums agree bit for bit
    with open(two, "rb") as f:
        stats = pickle.load(f)
    assert stats["num_images"] == 5
    np.testing.assert_allclose(stats["fid"]["sigma"], numpy_stats(block_means(images))["sigma"], rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------
# Bad input: one line, non-zero exit.


def test_reference_fails_before_any_work(data, detectors, run_cli, tmp_path):
    missing = tmp_path / "missing.pkl"
    result = run_cli("calc", "--images", tmp_path / "no-images", "--ref", missing, "--workers", 0)
    assert_one_line_error(result, "Cannot open feature statistics", "missing.pkl")
    not_stats = tmp_path / "not-stats.pkl"
    not_stats.write_bytes(pickle.dumps({"hello": "world"}))
    result = run_cli("calc", "--images", data.pngs, "--ref", not_stats, "--num", 2, "--workers", 0)
    assert_one_line_error(result, "not a feature statistics file")
    result = run_cli("gen", "--net", tmp_path / "no-net.pkl", "--ref", missing, "--num", 2)
    assert_one_line_error(result, "Cannot open feature statistics")
    assert detectors.fd_dinov2.calls == 0


def closed_port_url(path):
    """A URL nobody answers: fetching it would fail (and print 'Downloading')."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/{path}"


def test_bad_destination_fails_before_any_work(data, run_cli, tmp_path, monkeypatch, cache_dir):
    # No detectors registered: setting one up would try the unreachable URL.
    monkeypatch.setattr("training.metrics._detector_cache", {})
    monkeypatch.setattr("training.metrics.INCEPTION_URL", closed_port_url("inception.pkl"))
    monkeypatch.delenv("EDM2_INCEPTION_PKL", raising=False)
    (tmp_path / "folder.pkl").mkdir()
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    for dest, reason in [(tmp_path / "folder.pkl", "it is a folder"), (blocker / "refs" / "x.pkl", "is a file")]:
        result = run_cli("ref", "--data", data.zip, "--dest", dest, "--metrics", "fid", "--workers", 0)
        assert_one_line_error(result, "Cannot write statistics file", "--dest", reason)
        assert "Downloading" not in result.output and "Setting up" not in result.output
    # calc: the images are listed before the reference statistics are downloaded.
    result = run_cli("calc", "--images", tmp_path / "nowhere", "--ref", closed_port_url("ref.pkl"), "--workers", 0)
    assert_one_line_error(result, "Cannot read images", "nowhere")
    assert "Downloading" not in result.output
    # gen: a missing local network pickle fails before the reference statistics are downloaded.
    result = run_cli("gen", "--net", tmp_path / "no-net.pkl", "--ref", closed_port_url("ref.pkl"))
    assert_one_line_error(result, "Cannot open network pickle", "--net", "does not exist")
    assert "Downloading" not in result.output


def test_num_larger_than_available(data, detectors, run_cli, tmp_path):
    ref = tmp_path / "ref.pkl"
    cm.save_stats({"num_images": 10, "fid": numpy_stats(block_means(data.zip_images))}, str(ref), verbose=False)
    result = run_cli("calc", "--images", data.pngs, "--ref", ref, "--num", 15, "--workers", 0)
    assert_one_line_error(result, "Found 14 images", "at least 15")
    assert detectors.fd_dinov2.calls == 0
    assert_one_line_error(run_cli("calc", "--images", data.pngs, "--ref", ref, "--num", 1), "--num")


def test_unknown_metric(data, detectors, run_cli, tmp_path):
    result = run_cli("ref", "--data", data.zip, "--dest", tmp_path / "x.pkl", "--metrics", "fid,kid")
    assert_one_line_error(result, "--metrics", 'unknown metric "kid"')
    assert not (tmp_path / "x.pkl").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images(data, detectors, run_cli, tmp_path, workers):
    ref = tmp_path / "ref.pkl"
    cm.save_stats({"num_images": 10, "fid": numpy_stats(block_means(data.zip_images))}, str(ref), verbose=False)

    def calc(images):
        return run_cli(
            "calc", "--images", images, "--ref", ref, "--metrics", "fid", "--num", 2, "--batch", 2, "--workers", workers
        )

    assert_one_line_error(calc(tmp_path / "nowhere"), "Cannot read images", "nowhere")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(calc(tmp_path / "empty"), "Cannot read images", "No image")
    # A corrupt file among good ones fails while loading, also in a worker process.
    folder = tmp_path / "broken"
    write_png_folder(folder, random_images(3))
    (folder / "000001.png").write_bytes(b"this is not a PNG")
    assert_one_line_error(calc(folder), "Error: Cannot read 000001.png")


@pytest.mark.slow
def test_npz_reference_from_url_skips_missing_metric(data, detectors, run_cli, tmp_path, http_server, cache_dir):
    # An older-EDM .npz holds fid only: fd_dinov2 is computed but skipped with a message.
    ref = numpy_stats(block_means(data.zip_images))
    buf = io.BytesIO()
    np.savez(buf, mu=ref["mu"], sigma=ref["sigma"])
    http_server.routes["/refs/old-edm.npz"] = buf.getvalue()
    result = run_cli(
        "calc", "--images", data.pngs, "--ref", http_server.url("/refs/old-edm.npz"), "--num", 14, "--workers", 0
    )
    assert_ok(result)
    assert "No statistics computed for fd_dinov2 -- skipping." in result.stdout
    expected = reference_fd(numpy_stats(block_means(data.png_images)), ref)
    assert printed_metrics(result.stdout) == {"fid": pytest.approx(expected, rel=1e-5)}
    assert http_server.requests == ["/refs/old-edm.npz"]


# ----------------------------------------------------------------------------
# Repeated evaluations.


def test_calc_repeats_use_disjoint_subsets(data, detectors, run_cli, tmp_path):
    ref = tmp_path / "ref.pkl"
    ref_stats = numpy_stats(block_means(data.zip_images))
    cm.save_stats({"num_images": 10, "fid": ref_stats}, str(ref), verbose=False)
    out = tmp_path / "results" / "calc.jsonl"
    args = ["calc", "--images", data.pngs, "--ref", ref, "--metrics", "fid", "--num", 4, "--seed", 5, "--workers", 0]
    result = run_cli(*args, "--repeats", 3, "--out", out)
    assert_ok(result)

    # The documented split: one RandomState(5) shuffle of the 14 indices, cut into runs of 4.
    order = np.arange(14)
    np.random.RandomState(5).shuffle(order)
    subsets = [np.sort(order[k * 4 : (k + 1) * 4]) for k in range(3)]
    assert len(set(np.concatenate(subsets))) == 12
    expected = [reference_fd(numpy_stats(block_means(data.png_images[s])), ref_stats) for s in subsets]
    printed = re.findall(r"^fid = (\S+)$", result.stdout, flags=re.MULTILINE)
    assert [float(v) for v in printed] == pytest.approx(expected, rel=1e-5)
    row = re.search(r"^fid +([-+.\deE]+) +(\S+) +(\S+) ", result.stdout, flags=re.MULTILINE)
    assert [float(v) for v in row.groups()] == pytest.approx(
        [min(expected), np.mean(expected), np.std(expected, ddof=1)], rel=1e-5
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line.get("subset") for line in lines] == [0, 1, 2, None]
    assert [line["results"]["fid"] for line in lines[:3]] == pytest.approx(expected, rel=1e-5)
    summary = lines[3]["summary"]["fid"]
    assert summary["std"] == pytest.approx(np.std(expected, ddof=1), rel=1e-5)
    assert summary["mean"] == pytest.approx(np.mean(expected), rel=1e-5) and summary["min"] == min(summary["values"])

    # One repeat prints what a plain run prints, and its subset is the first of the split.
    plain, one = run_cli(*args), run_cli(*args, "--repeats", 1, "--out", tmp_path / "one.jsonl")
    assert_ok(plain)
    assert one.stdout == plain.stdout
    assert printed_metrics(plain.stdout) == {"fid": pytest.approx(expected[0], rel=1e-5)}
    # Not enough images for disjoint subsets: one line, before any features are computed.
    calls = detectors.fd_dinov2.calls
    result = run_cli(*args[:5], "--num", 4, "--seed", 5, "--workers", 0, "--repeats", 4)
    assert_one_line_error(result, "Found 14 images", "at least 16", "4 disjoint sets of 4")
    assert detectors.fd_dinov2.calls == calls


def test_repeat_summary_matches_numpy():
    values = [3.5, 2.25, 4.0, 2.75]
    summary = cm.summarize_repeats([{"fid": v, "fd_dinov2": 2 * v} for v in values])
    assert summary["fid"] == dict(
        values=values, min=2.25, mean=np.mean(values), std=pytest.approx(np.std(values, ddof=1))
    )
    assert summary["fd_dinov2"]["std"] == pytest.approx(2 * np.std(values, ddof=1))
    assert cm.summarize_repeats([{"fid": 1.5}])["fid"]["std"] is None
    assert [list(s) for s in cm.repeat_seeds(0, 50000, 3)] == [
        list(range(0, 50000)),
        list(range(50000, 100000)),
        list(range(100000, 150000)),
    ]


def test_json_lines_survive_a_partial_line(tmp_path):
    path = str(tmp_path / "r.jsonl")
    cm.append_json_line(path, {"a": 1})
    with open(path, "ab") as f:
        f.write(b'{"a": 2, "trunc')  # a writer killed mid-line
    cm.append_json_line(path, {"a": 3})
    assert cm.read_json_lines(path) == [{"a": 1}, {"a": 3}]


@pytest.mark.slow
def test_gen_repeats_match_one_run_per_seed_set(data, detectors, run_cli, tmp_path):
    net = tiny_network_pickle(tmp_path / "net.pkl")
    ref = tmp_path / "ref.pkl"
    cm.save_stats({"num_images": 10, "fid": numpy_stats(block_means(data.zip_images))}, str(ref), verbose=False)
    common = ["gen", "--net", net, "--ref", ref, "--metrics", "fid", "--num", 3, "--batch", 2, "--steps", 4]
    result = run_cli(*common, "--seed", 7, "--repeats", 3, "--out", tmp_path / "gen.jsonl")
    assert_ok(result)
    separate = []
    for seed in (7, 10, 13):  # the documented seed sets 7-9, 10-12, 13-15, each run on its own
        one = run_cli(*common, "--seed", seed, "--out", tmp_path / f"seed{seed}.jsonl")
        assert_ok(one)
        separate.append(json.loads((tmp_path / f"seed{seed}.jsonl").read_text().splitlines()[0])["results"]["fid"])
        assert printed_metrics(one.stdout)["fid"] == pytest.approx(separate[-1], rel=1e-5)
    assert len(set(separate)) == 3
    lines = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert [line.get("seeds") for line in lines] == ["7-9", "10-12", "13-15", None]
    assert [line["results"]["fid"] for line in lines[:3]] == separate
    summary = lines[3]["summary"]["fid"]
    assert summary["min"] == min(separate)
    assert summary["mean"] == pytest.approx(np.mean(separate), rel=1e-12)
    assert summary["std"] == pytest.approx(np.std(separate, ddof=1), rel=1e-12)
    assert "Summary over 3 repeats:" in result.stdout
