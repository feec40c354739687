"""Tests of the metric library in calculate_metrics.py: the Fréchet distance against closed forms,
the scipy.linalg.sqrtm reference formula and an exact computation from the features; feature
statistics against numpy; statistics files (.pkl, .npz, URLs); DINOv2 preprocessing; detector
loading from local files, URLs and hub folders, and the messages when a detector is missing.
"""

import io
import os
import pickle
import warnings

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch

import calculate_metrics as cm
from tests.scripts import metrics_detectors as md
from torch_utils import persistence

# ----------------------------------------------------------------------------
# Fréchet distance.


def reference_fd(mu1, sigma1, mu2, sigma2):
    """The reference implementation's formula, for comparison only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm's `disp` deprecation, singular-matrix warnings
        s, _ = scipy.linalg.sqrtm(np.dot(sigma1, sigma2), disp=False)
    return float(np.real(np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - s * 2)))


def correlated_features(num, dim, seed, shift=0.0):
    """ReLU'd correlated Gaussian features with a power-law spectrum (like pooled CNN features)."""
    mixing = np.random.default_rng(1234).standard_normal((dim, dim)) * (np.arange(1, dim + 1) ** -0.7)[:, None]
    return np.maximum(np.random.default_rng(seed).standard_normal((num, dim)) @ mixing + shift, 0)


def exact_fd_from_features(x1, x2):
    """FD from the features themselves: with sigma_i = A_i^T A_i (A_i the centred features over
    sqrt(N_i - 1)), the nonzero eigenvalues of sigma1 sigma2 are the squared singular values of
    A1 A2^T, so tr (sigma1 sigma2)^(1/2) is the nuclear norm of that small matrix."""
    mu1, mu2 = x1.mean(0), x2.mean(0)
    a1, a2 = (x1 - mu1) / np.sqrt(len(x1) - 1), (x2 - mu2) / np.sqrt(len(x2) - 1)
    tr_sqrt = scipy.linalg.svdvals(a1 @ a2.T).sum()
    return float(np.square(mu1 - mu2).sum() + np.square(a1).sum() + np.square(a2).sum() - 2 * tr_sqrt)


def test_fd_closed_form_commuting_covariances():
    # Covariances with common eigenvectors: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    rng = np.random.default_rng(0)
    d = 64
    u = np.linalg.qr(rng.standard_normal((d, d)))[0]
    a, b = rng.uniform(0.1, 4, d), rng.uniform(0.1, 4, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    sigma1, sigma2 = (u * a) @ u.T, (u * b) @ u.T
    expected = np.square(mu1 - mu2).sum() + np.square(np.sqrt(a) - np.sqrt(b)).sum()
    assert cm.calculate_fd(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-10)
    assert cm.calculate_fd(mu1, sigma1, mu1, sigma1) == pytest.approx(0, abs=1e-9)
    # Singular (rank 10) covariances with a shared eigenbasis take the pivoted-Cholesky path.
    a[10:] = 0
    sigma1 = (u * a) @ u.T
    expected = np.square(mu1 - mu2).sum() + np.square(np.sqrt(a) - np.sqrt(b)).sum()
    assert cm.calculate_fd(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_fd_rejects_bad_input():
    with pytest.raises(ValueError, match="shapes"):
        cm.calculate_fd(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        cm.calculate_fd(np.zeros(2), np.eye(2), np.array([0, np.nan]), np.eye(2))


@pytest.mark.slow
def test_fd_matches_sqrtm_at_2048d():
    # Full rank: 2048-d covariances of 3000 correlated samples each.
    x1 = correlated_features(3000, 2048, seed=1)
    x2 = correlated_features(3000, 2048, seed=2, shift=0.05)
    stats = (x1.mean(0), np.cov(x1, rowvar=False), x2.mean(0), np.cov(x2, rowvar=False))
    assert cm.calculate_fd(*stats) == pytest.approx(reference_fd(*stats), rel=1e-6)


def test_fd_rank_deficient():
    # Fewer samples than dimensions: singular covariances (rank N - 1), 384-d.
    d = 384
    x1 = correlated_features(300, d, seed=3)
    x2 = correlated_features(1200, d, seed=4, shift=0.05)
    stats = (x1.mean(0), np.cov(x1, rowvar=False), x2.mean(0), np.cov(x2, rowvar=False))
    ours = cm.calculate_fd(*stats)
    assert ours == pytest.approx(reference_fd(*stats), rel=1e-6)
    assert ours == pytest.approx(exact_fd_from_features(x1, x2), rel=1e-10)


def test_fd_strongly_rank_deficient_is_exact():
    # Both sets far below the dimension. sqrtm(sigma1 sigma2) then adds the square roots of
    # rounding noise in the large null space (~1e-6 relative here); ours stays exact, and the
    # difference to the reference is exactly the reference's own error.
    d = 384
    x1 = correlated_features(200, d, seed=3)
    x2 = correlated_features(300, d, seed=4, shift=0.05)
    stats = (x1.mean(0), np.cov(x1, rowvar=False), x2.mean(0), np.cov(x2, rowvar=False))
    ours, ref, exact = cm.calculate_fd(*stats), reference_fd(*stats), exact_fd_from_features(x1, x2)
    assert ours == pytest.approx(exact, rel=1e-10)
    assert ours == pytest.approx(ref, rel=3e-6)
    assert abs(ours - ref) == pytest.approx(abs(exact - ref), rel=1e-3)


# ----------------------------------------------------------------------------
# Feature statistics.


def random_images(num, res=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(num, 3, res, res), dtype=np.uint8)


def block_means(images):
    """PoolDetector's features computed independently in numpy (float64)."""
    n, c, h, w = images.shape
    return images.reshape(n, c, 2, h // 2, 2, w // 2).astype(np.float64).mean(axis=(3, 5)).reshape(n, -1)


def run_stats(image_iter, **kwargs):
    last = None
    for r in cm.calculate_stats_for_iterable(image_iter, verbose=False, device="cpu", **kwargs):
        last = r
    return last


def test_stats_equal_numpy_mean_and_cov():
    images = random_images(37)
    batches = [images[:10], (torch.from_numpy(images[10:11]), None), {"images": images[11:30]}, None, images[30:]]
    conv = md.ConvDetector(seed=1)
    r = run_stats(batches, metrics=["fid", "fd_dinov2"], detectors={"fid": md.PoolDetector(), "fd_dinov2": conv})
    assert r.batch_idx == 4 and r.num_batches == 5
    assert r.stats["num_images"] == 37 and list(r.stats) == ["num_images", "fid", "fd_dinov2"]

    # Known moments: the pool features are exact block means.
    f = block_means(images)
    assert r.stats["fid"]["mu"].dtype == np.float64 and r.stats["fid"]["sigma"].dtype == np.float64
    np.testing.assert_allclose(r.stats["fid"]["mu"], f.mean(0), rtol=1e-13)
    np.testing.assert_allclose(r.stats["fid"]["sigma"], np.cov(f, rowvar=False), rtol=1e-9, atol=1e-9)

    with torch.no_grad():
        g = conv(torch.from_numpy(images)).double().numpy()
    np.testing.assert_allclose(r.stats["fd_dinov2"]["mu"], g.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(r.stats["fd_dinov2"]["sigma"], np.cov(g, rowvar=False), rtol=1e-5, atol=1e-7)


def test_stats_grayscale_is_rgb_and_progress_counts():
    images = random_images(5)
    gray = images[:, :1]
    counts = []
    for r in cm.calculate_stats_for_iterable(
        [gray[:2], gray[2:]], metrics=["fid"], verbose=False, device="cpu", detectors={"fid": md.PoolDetector()}
    ):
        counts.append(r.num_images)
    assert counts == [2, 5]
    f = block_means(np.repeat(gray, 3, axis=1))
    np.testing.assert_allclose(r.stats["fid"]["mu"], f.mean(0), rtol=1e-13)


def test_stats_need_two_images(tmp_path):
    det = {"fid": md.PoolDetector()}
    with pytest.raises(ValueError, match="at least 2 images"):
        run_stats([random_images(1)], metrics=["fid"], detectors=det, dest_path=str(tmp_path / "s.pkl"))
    with pytest.raises(ValueError, match="at least 2 images"):
        run_stats([None, random_images(0)], metrics=["fid"], detectors=det)
    assert not (tmp_path / "s.pkl").exists()
    with pytest.raises(ValueError, match="uint8"):
        run_stats([random_images(3).astype(np.float32)], metrics=["fid"], detectors=det)


def test_stats_for_files_subset_rule(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    images = random_images(10, seed=5)
    for i, image in enumerate(images):
        PIL.Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i:03d}.png")
    it = cm.calculate_stats_for_files(
        str(folder),
        num_images=4,
        seed=7,
        max_batch_size=3,
        num_workers=0,
        metrics=["fid"],
        detectors={"fid": md.PoolDetector()},
        verbose=False,
        device="cpu",
    )
    assert len(it) == 2  # max((4-1)//3+1, 1) batches
    stats = list(it)[-1].stats
    # The reference's rule: legacy RandomState(seed) shuffle of all indices, keep the first num, file order.
    idx = np.arange(10)
    np.random.RandomState(7).shuffle(idx)
    f = block_means(images[np.sort(idx[:4])])
    np.testing.assert_allclose(stats["fid"]["mu"], f.mean(0), rtol=1e-13)
    np.testing.assert_allclose(stats["fid"]["sigma"], np.cov(f, rowvar=False), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="Found 10 images.*at least 11"):
        cm.calculate_stats_for_files(str(folder), num_images=11, metrics=["fid"], verbose=False)


# ----------------------------------------------------------------------------
# Statistics files.


def example_stats(dims=(3, 4), seed=0):
    rng = np.random.default_rng(seed)
    stats = dict(num_images=123)
    for metric, d in zip(["fid", "fd_dinov2"], dims):
        a = rng.standard_normal((d, d))
        stats[metric] = dict(mu=rng.standard_normal(d), sigma=a @ a.T)
    return stats


def assert_same_stats(a, b):
    assert list(a) == list(b)
    for key in a:
        if key == "num_images":
            assert a[key] == b[key]
        else:
            assert list(a[key]) == ["mu", "sigma"]
            for k in ("mu", "sigma"):
                assert a[key][k].dtype == np.float64
                np.testing.assert_array_equal(a[key][k], b[key][k])


def test_pkl_layout_and_roundtrip(tmp_path):
    images = random_images(6)
    path = tmp_path / "sub" / "stats.pkl"
    r = run_stats(
        [images[:4], images[4:]],
        metrics=["fid", "fd_dinov2"],
        dest_path=str(path),
        detectors={"fid": md.PoolDetector(), "fd_dinov2": md.ConvDetector()},
    )
    with open(path, "rb") as f:
        raw = pickle.load(f)  # the reference's layout, readable by plain pickle
    assert type(raw) is dict and list(raw) == ["num_images", "fid", "fd_dinov2"] and raw["num_images"] == 6
    assert type(raw["fid"]) is dict and list(raw["fid"]) == ["mu", "sigma"]
    assert raw["fid"]["mu"].shape == (12,) and raw["fid"]["sigma"].shape == (12, 12)
    assert_same_stats(raw, r.stats)
    assert_same_stats(cm.load_stats(str(path), verbose=False), raw)
    assert [p.name for p in path.parent.iterdir()] == ["stats.pkl"]  # no temporary files left


@pytest.mark.parametrize("name", ["ref.npz", "REF.NPZ"])
def test_npz_is_read_as_fid(tmp_path, name):
    stats = example_stats()
    with open(tmp_path / name, "wb") as f:  # (np.savez would append '.npz' to 'REF.NPZ')
        np.savez(f, mu=stats["fid"]["mu"], sigma=stats["fid"]["sigma"])
    loaded = cm.load_stats(str(tmp_path / name), verbose=False)
    assert list(loaded) == ["fid"] and sorted(loaded["fid"]) == ["mu", "sigma"]
    np.testing.assert_array_equal(loaded["fid"]["sigma"], stats["fid"]["sigma"])


def test_missing_metric_is_skipped(capsys):
    stats = example_stats()
    ref = example_stats(seed=1)
    del ref["fd_dinov2"]
    results = cm.calculate_metrics_from_stats(stats, ref, metrics=["fid", "fd_dinov2"])
    out = capsys.readouterr().out
    assert list(results) == ["fid"]
    assert "No statistics computed for fd_dinov2 -- skipping." in out
    s, r = stats["fid"], ref["fid"]
    assert results["fid"] == pytest.approx(reference_fd(s["mu"], s["sigma"], r["mu"], r["sigma"]), rel=1e-9)
    assert f"fid = {results['fid']:g}" in out


def test_stats_from_url_are_cached(tmp_path, http_server, cache_dir):
    stats = example_stats()
    http_server.routes["/refs/img.pkl"] = pickle.dumps(stats)
    buf = io.BytesIO()
    np.savez(buf, mu=stats["fid"]["mu"], sigma=stats["fid"]["sigma"])
    http_server.routes["/refs/old.npz"] = buf.getvalue()
    for _ in range(2):
        assert_same_stats(cm.load_stats(http_server.url("/refs/img.pkl"), verbose=False), stats)
        loaded = cm.load_stats(http_server.url("/refs/old.npz"), verbose=False)
        np.testing.assert_array_equal(loaded["fid"]["mu"], stats["fid"]["mu"])
    assert http_server.requests == ["/refs/img.pkl", "/refs/old.npz"]  # once each, then from the cache
    assert len(os.listdir(cache_dir / "downloads")) == 2


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "content,fragment",
    [
        (b"not a pickle at all", "not a feature statistics file"),
        (pickle.dumps([1, 2, 3]), "expected a dict"),
        (pickle.dumps(dict(num_images=3)), "no metrics"),
        (pickle.dumps(dict(fid=dict(mu=np.zeros(3)))), "no mu and sigma"),
        (pickle.dumps(dict(fid=dict(mu=np.zeros(3), sigma=np.eye(2)))), "shape"),
        (pickle.dumps(dict(fid=_Evil())), "posix.system"),
    ],
)
def test_bad_statistics_files(tmp_path, content, fragment):
    path = tmp_path / "bad.pkl"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        cm.load_stats(str(path), verbose=False)
    message = str(info.value)
    assert fragment in message and "\n" not in message
    with pytest.raises(OSError, match="Cannot open"):
        cm.load_stats(str(tmp_path / "missing.pkl"), verbose=False)


# ----------------------------------------------------------------------------
# DINOv2 preprocessing (no weights needed).


def normalise(x255):
    mean = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    return (x255 / 255 - mean) / std


@pytest.mark.parametrize("mode", ["torch", "pil"])
def test_dinov2_preprocess_constant_image(mode):
    x = torch.tensor([10, 128, 250], dtype=torch.uint8).reshape(1, 3, 1, 1).repeat(2, 1, 37, 53)
    y = cm.dinov2_preprocess(x, mode)
    assert y.dtype == torch.float32 and y.shape == (2, 3, 224, 224)
    np.testing.assert_allclose(
        y.numpy(),
        np.broadcast_to(normalise(np.array([10.0, 128.0, 250.0]).reshape(1, 3, 1, 1)), (2, 3, 224, 224)),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("res", [32, 300])
def test_dinov2_preprocess_resize(res):
    img = np.random.default_rng(res).integers(0, 256, size=(res, res, 3), dtype=np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]

    # torch path: float bicubic with antialias, no clamping or rounding. Pillow's float ('F') mode
    # implements the same antialiased bicubic (a = -0.5) independently.
    expected = np.stack(
        [
            np.asarray(
                PIL.Image.fromarray(img[:, :, c].astype(np.float32), "F").resize(
                    (224, 224), PIL.Image.Resampling.BICUBIC
                )
            )
            for c in range(3)
        ]
    )[None]
    y_torch = cm.dinov2_preprocess(x, "torch").numpy()
    np.testing.assert_allclose(y_torch, normalise(expected.astype(np.float64)), atol=0.01 / 255 / 0.224)
    assert expected.min() < 0 or expected.max() > 255  # overshoot is kept (not clamped)

    # Pillow path: uint8 bicubic resize of the RGB image, as in dgm-eval.
    expected = np.asarray(PIL.Image.fromarray(img).resize((224, 224), PIL.Image.Resampling.BICUBIC))
    y_pil = cm.dinov2_preprocess(x, "pil").numpy()
    np.testing.assert_allclose(y_pil, normalise(expected.transpose(2, 0, 1)[None].astype(np.float64)), atol=1e-5)

    with pytest.raises(ValueError, match="resize mode"):
        cm.dinov2_preprocess(x, "nearest")


# ----------------------------------------------------------------------------
# Detectors: loading from files, URLs and hub folders; missing detectors.


@pytest.fixture
def clean_detectors(monkeypatch):
    monkeypatch.setattr("training.metrics._detector_cache", {})
    for var in ("EDM2_INCEPTION_PKL", "EDM2_DINOV2_REPO"):
        monkeypatch.delenv(var, raising=False)


def test_inception_from_local_file(tmp_path, monkeypatch, clean_detectors):
    module = md.TinyInception(feature_dim=6)
    path = tmp_path / "inception.pkl"
    path.write_bytes(pickle.dumps(module))
    monkeypatch.setenv("EDM2_INCEPTION_PKL", str(path))
    det = cm.get_detector("fid", verbose=False)
    assert det is cm.get_detector("fid") and det.feature_dim == 2048
    # The pickle carries its own source: only the trusting loader reads it.
    with pytest.raises(persistence.UnsafePickleError):
        persistence.safe_load(str(path))
    assert type(det.model).__name__ == "TinyInception"
    x = torch.from_numpy(random_images(3))
    with torch.no_grad():
        np.testing.assert_allclose(det(x).numpy(), module(x, return_features=True).numpy(), rtol=1e-6)


def test_inception_from_url_is_cached(http_server, cache_dir, monkeypatch, clean_detectors):
    http_server.routes["/metrics/inception-2015-12-05.pkl"] = pickle.dumps(md.TinyInception())
    monkeypatch.setattr("training.metrics.INCEPTION_URL", http_server.url("/metrics/inception-2015-12-05.pkl"))
    for _ in range(2):
        det = cm.InceptionV3Detector(verbose=False)
        assert det(torch.from_numpy(random_images(2))).shape == (2, 6)
    assert http_server.requests == ["/metrics/inception-2015-12-05.pkl"]


def test_missing_inception_says_what_to_download(tmp_path, monkeypatch, cache_dir, clean_detectors):
    monkeypatch.setenv("EDM2_INCEPTION_PKL", str(tmp_path / "nowhere.pkl"))
    with pytest.raises(cm.DetectorUnavailableError) as info:
        cm.get_detector("fid", verbose=False)
    message = str(info.value)
    assert "\n" not in message and "nowhere.pkl" in message
    assert cm.INCEPTION_URL in message and "EDM2_INCEPTION_PKL" in message
    assert str(cache_dir / "downloads") in message


def write_fake_dinov2_repo(folder, feature_dim=5):
    """A hub repository whose dinov2_vitl14 is a small seeded linear model on the 224x224 input."""
    folder.mkdir(parents=True)
    (folder / "hubconf.py").write_text(
        "import torch\n"
        "class Head(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        f"        self.proj = torch.nn.Linear(3, {feature_dim})\n"
        "    def forward(self, x):\n"
        "        assert x.shape[1:] == (3, 224, 224) and x.dtype == torch.float32\n"
        "        return self.proj(x.mean(dim=[2, 3]))\n"
        "def dinov2_vitl14(**kwargs):\n"
        "    torch.manual_seed(0)\n"
        "    return Head()\n"
    )
    return folder


@pytest.mark.parametrize("where", ["env", "hub_cache"])
def test_dinov2_from_local_repo(tmp_path, cache_dir, monkeypatch, clean_detectors, where):
    if where == "env":
        monkeypatch.setenv("EDM2_DINOV2_REPO", str(write_fake_dinov2_repo(tmp_path / "dinov2")))
    else:  # the layout torch.hub leaves in <dnnlib cache>/torch_hub after a download
        write_fake_dinov2_repo(cache_dir / "torch_hub" / "facebookresearch_dinov2_main")
    hub_dir_before = torch.hub.get_dir()
    det = cm.get_detector("fd_dinov2", verbose=False)
    assert torch.hub.get_dir() == hub_dir_before
    assert det.feature_dim == 1024 and det.resize_mode == "torch"
    x = torch.from_numpy(random_images(2, res=16))
    with torch.no_grad():
        expected = det.model(cm.dinov2_preprocess(x))
        np.testing.assert_allclose(det(x).numpy(), expected.numpy(), rtol=1e-6)


def test_missing_dinov2_says_what_to_download(tmp_path, cache_dir, monkeypatch, clean_detectors):
    monkeypatch.setenv("EDM2_DINOV2_REPO", str(tmp_path / "no-such-repo"))
    with pytest.raises(cm.DetectorUnavailableError) as info:
        cm.get_detector("fd_dinov2", verbose=False)
    message = str(info.value)
    assert "\n" not in message and "no-such-repo" in message
    assert "https://github.com/facebookresearch/dinov2" in message and cm.DINOV2_WEIGHTS_URL in message
    assert str(cache_dir / "torch_hub" / "facebookresearch_dinov2_main") in message
    assert str(cache_dir / "torch_hub" / "checkpoints") in message


def test_register_detector(clean_detectors):
    with pytest.raises(ValueError, match="feature_dim"):
        cm.register_detector("mine", torch.nn.Identity())
    cm.register_detector("mine", md.PoolDetector())
    assert "mine" in cm.known_metrics() and cm.get_detector("mine").feature_dim == 12
    cm.register_detector("mine", None)
    with pytest.raises(ValueError, match='Unknown metric "mine"'):
        cm.get_detector("mine")
