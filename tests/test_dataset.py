"""Tests for training/dataset.py: ImageFolderDataset over PNG and NPY, folder and ZIP; labels, xflip,
max_size, cache, errors, pickling, and data-loader workers (own ZIP handles, flat memory)."""

import io
import json
import os
import pickle
import zipfile

import numpy as np
import PIL.Image
import psutil
import pytest
import torch

import dnnlib
from training.dataset import ImageFolderDataset

# ----------------------------------------------------------------------------
# Builders: the same files as a folder or as a ZIP.


def png_bytes(img):
    buf = io.BytesIO()
    PIL.Image.fromarray(img).save(buf, format="png")
    return buf.getvalue()


def npy_bytes(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def write_dataset(path, files, kind):
    """files: {relative name: bytes}; kind 'zip' or 'dir'. Returns the dataset path."""
    if kind == "zip":
        path = str(path) + ".zip"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
            for name, data in files.items():
                z.writestr(name, data)
        return path
    for name, data in files.items():
        full = os.path.join(str(path), *name.split("/"))
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data)
    return str(path)


def labels_json(labels):
    return json.dumps({"labels": labels}).encode()


def rgb_images(n, res=8):
    return [np.random.RandomState(i).randint(0, 256, [res, res, 3]).astype(np.uint8) for i in range(n)]


# ----------------------------------------------------------------------------
# 4. Shapes, dtypes, labels.


@pytest.mark.parametrize("kind", ["zip", "dir"])
def test_png_dataset_shapes_dtypes_and_onehot_labels(tmp_path, kind):
    imgs = rgb_images(5)
    # Stored out of order and in two folders: items follow the sorted relative paths.
    names = [
        "00001/img00000004.png",
        "00000/img00000002.png",
        "00000/img00000000.png",
        "00000/img00000001.png",
        "00001/img00000003.png",
    ]
    raw_labels = {n: [3, 0, 5, 1, 0][int(n[-6:-4])] for n in names}
    files = {n: png_bytes(imgs[int(n[-6:-4])]) for n in names}
    files["dataset.json"] = labels_json([[n, raw_labels[n]] for n in names])
    path = write_dataset(tmp_path / "data", files, kind)

    ds = dnnlib.util.construct_class_by_name(
        class_name="training.dataset.ImageFolderDataset", path=path, use_labels=True
    )
    assert len(ds) == 5 and ds.name == "data"
    assert ds.image_shape == [3, 8, 8] and ds.num_channels == 3 and ds.resolution == 8
    assert ds.label_shape == [6] and ds.label_dim == 6 and ds.has_labels and ds.has_onehot_labels
    for i in range(5):
        image, label = ds[i]
        assert image.dtype == np.uint8 and image.shape == (3, 8, 8)
        np.testing.assert_array_equal(image, imgs[i].transpose(2, 0, 1))
        expected = np.zeros(6, np.float32)
        expected[[3, 0, 5, 1, 0][i]] = 1
        assert label.dtype == np.float32
        np.testing.assert_array_equal(label, expected)
        np.testing.assert_array_equal(ds.get_label(i), expected)
        assert ds.get_details(i).raw_idx == i and ds.get_details(i).raw_label == [3, 0, 5, 1, 0][i]

    unlabelled = ImageFolderDataset(path, use_labels=False)
    assert unlabelled.label_shape == [0] and unlabelled.label_dim == 0 and not unlabelled.has_labels
    assert unlabelled[0][1].shape == (0,) and unlabelled[0][1].dtype == np.float32
    ds.close()


@pytest.mark.parametrize("kind", ["zip", "dir"])
def test_npy_dataset_float_labels_and_reshape(tmp_path, kind):
    latents = [np.random.RandomState(i).randn(8, 4, 4).astype(np.float32) for i in range(3)]
    files = {f"00000/img-mean-std-{i:08d}.npy": npy_bytes(a) for i, a in enumerate(latents)}
    files["extra/stacked.npy"] = npy_bytes(latents[0].reshape(2, 4, 4, 4))  # reshaped to [-1, H, W]
    float_labels = [[0.25, -1.0], [2.0, 0.0], [1.5, 3.0], [0.0, 0.0]]
    names = sorted(files)
    files["dataset.json"] = labels_json([[n, float_labels[i]] for i, n in enumerate(names)])
    path = write_dataset(tmp_path / "latents", files, kind)

    ds = ImageFolderDataset(path)
    assert len(ds) == 4 and ds.image_shape == [8, 4, 4] and ds.resolution == 4
    assert ds.label_shape == [2] and ds.has_labels and not ds.has_onehot_labels
    for i in range(3):
        image, label = ds[i]
        assert image.dtype == np.float32
        np.testing.assert_array_equal(image, latents[i])
        assert label.dtype == np.float32
        np.testing.assert_array_equal(label, np.float32(float_labels[i]))
    np.testing.assert_array_equal(ds[3][0], latents[0])


def test_grayscale_png_keeps_one_channel_and_null_labels(tmp_path):
    gray = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16).astype(np.uint8)
    path = write_dataset(tmp_path / "g", {"a.png": png_bytes(gray), "dataset.json": labels_json(None)}, "dir")
    ds = ImageFolderDataset(path, resolution=16)
    assert ds.image_shape == [1, 16, 16] and ds.num_channels == 1
    np.testing.assert_array_equal(ds[0][0], gray[None])
    assert ds.label_dim == 0 and not ds.has_labels


def test_missing_label_entry_is_an_error(tmp_path):
    imgs = rgb_images(2)
    files = {"a.png": png_bytes(imgs[0]), "b.png": png_bytes(imgs[1]), "dataset.json": labels_json([["a.png", 0]])}
    ds = ImageFolderDataset(write_dataset(tmp_path / "d", files, "zip"))
    with pytest.raises(OSError, match="b.png"):
        _ = ds.label_dim


@pytest.mark.parametrize("kind", ["zip", "dir"])
def test_labels_of_absent_files_are_an_error(tmp_path, kind):
    imgs = rgb_images(2)
    files = {"a.png": png_bytes(imgs[0]), "b.png": png_bytes(imgs[1])}
    ghosts = [f"ghost{i}.png" for i in range(6)]
    files["dataset.json"] = labels_json([["a.png", 0], ["b.png", 1]] + [[g, 2] for g in ghosts])
    ds = ImageFolderDataset(write_dataset(tmp_path / "d", files, kind))
    with pytest.raises(
        OSError, match=r"6 file.*ghost0\.png, ghost1\.png, ghost2\.png, ghost3\.png, ghost4\.png, \.\.\."
    ) as info:
        _ = ds.label_dim
    assert "ghost5" not in str(info.value)
    assert ImageFolderDataset(write_dataset(tmp_path / "u", files, kind), use_labels=False).label_dim == 0


def test_symlinked_folders_and_files_are_followed(tmp_path):
    imgs = rgb_images(3)
    write_dataset(tmp_path / "real", {"00000/a.png": png_bytes(imgs[0]), "b.png": png_bytes(imgs[1])}, "dir")
    data = tmp_path / "data"
    data.mkdir()
    (data / "c.png").write_bytes(png_bytes(imgs[2]))
    try:
        os.symlink(tmp_path / "real" / "00000", data / "00000", target_is_directory=True)
        os.symlink(tmp_path / "real" / "b.png", data / "b.png")
        os.symlink(data, data / "00000" / "loop", target_is_directory=True)  # back up: must not recurse forever
    except (OSError, NotImplementedError):
        pytest.skip("this system cannot create symbolic links")
    (data / "dataset.json").write_text(json.dumps({"labels": [["00000/a.png", 0], ["b.png", 1], ["c.png", 2]]}))
    ds = ImageFolderDataset(str(data))
    assert len(ds) == 3
    for i in range(3):
        image, label = ds[i]
        np.testing.assert_array_equal(image, imgs[i].transpose(2, 0, 1))
        assert label.argmax() == i


# ----------------------------------------------------------------------------
# xflip, max_size, cache.


def test_xflip_appends_mirrored_copies(tmp_path):
    imgs = rgb_images(3)
    files = {f"{i}.png": png_bytes(img) for i, img in enumerate(imgs)}
    files["dataset.json"] = labels_json([[f"{i}.png", i] for i in range(3)])
    ds = ImageFolderDataset(write_dataset(tmp_path / "d", files, "zip"), xflip=True)
    assert len(ds) == 6
    for i in range(6):
        image, label = ds[i]
        chw = imgs[i % 3].transpose(2, 0, 1)
        np.testing.assert_array_equal(image, chw[:, :, ::-1] if i >= 3 else chw)
        assert label.argmax() == i % 3
        d = ds.get_details(i)
        assert d.raw_idx == i % 3 and d.xflip == (i >= 3)


def test_max_size_seeded_subset(tmp_path):
    n, k = 20, 6
    files = {f"{i:02d}.npy": npy_bytes(np.full([1, 2, 2], i, np.float32)) for i in range(n)}
    path = write_dataset(tmp_path / "d", files, "dir")

    def items(**kwargs):
        ds = ImageFolderDataset(path, **kwargs)
        return [int(ds[i][0][0, 0, 0]) for i in range(len(ds))]

    # The reference's rule: legacy RandomState(seed % 2**31) shuffle of 0..N-1, first max_size, sorted.
    for seed in [0, 7]:
        perm = np.arange(n)
        np.random.RandomState(seed).shuffle(perm)
        assert items(max_size=k, random_seed=seed) == sorted(perm[:k].tolist())
    assert items(max_size=k, random_seed=3) == items(max_size=k, random_seed=3)  # same across runs
    assert items(max_size=k, random_seed=3) != items(max_size=k, random_seed=4)
    assert items(max_size=k, random_seed=2**31 + 3) == items(max_size=k, random_seed=3)
    assert items(max_size=n) == list(range(n)) and items(max_size=100) == list(range(n))
    # max_size first, then xflip doubles the subset.
    subset = items(max_size=k, random_seed=3)
    assert items(max_size=k, random_seed=3, xflip=True) == subset + subset


def test_cache_keeps_loaded_items(tmp_path):
    imgs = rgb_images(2)
    path = write_dataset(tmp_path / "d", {"a.png": png_bytes(imgs[0]), "b.png": png_bytes(imgs[1])}, "dir")
    cached = ImageFolderDataset(path, cache=True)
    plain = ImageFolderDataset(path, cache=False)
    first = cached[1][0]
    first[:] = 0  # items are copies: changing one does not change the cache
    plain[1]
    os.remove(os.path.join(path, "b.png"))
    np.testing.assert_array_equal(cached[1][0], imgs[1].transpose(2, 0, 1))
    with pytest.raises(OSError, match="b.png"):
        plain[1]


# ----------------------------------------------------------------------------
# Bad paths.


def test_bad_paths_raise_ioerror(tmp_path):
    with pytest.raises(IOError, match="does not exist"):
        ImageFolderDataset(str(tmp_path / "missing.zip"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(IOError, match="directory or a .zip"):
        ImageFolderDataset(str(tmp_path / "file.txt"))
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with pytest.raises(IOError, match="ZIP"):
        ImageFolderDataset(str(tmp_path / "broken.zip"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "dataset.json").write_text('{"labels": null}')
    with pytest.raises(IOError, match="No image"):
        ImageFolderDataset(str(tmp_path / "empty"))
    path = write_dataset(tmp_path / "d", {"a.png": png_bytes(rgb_images(1)[0])}, "zip")
    with pytest.raises(IOError, match="resolution 16"):
        ImageFolderDataset(path, resolution=16)


# ----------------------------------------------------------------------------
# Pickling and data-loader workers.


def test_pickle_drops_the_zip_handle(tmp_path):
    imgs = rgb_images(3)
    path = write_dataset(tmp_path / "d", {f"{i}.png": png_bytes(img) for i, img in enumerate(imgs)}, "zip")
    ds = ImageFolderDataset(path)
    ds[0]
    assert isinstance(ds._zipfile, zipfile.ZipFile)  # opened on use
    state = pickle.dumps(ds)  # an open ZipFile cannot be pickled
    copy = pickle.loads(state)
    assert copy._zipfile is None
    np.testing.assert_array_equal(copy[2][0], imgs[2].transpose(2, 0, 1))
    ds.close()
    assert ds._zipfile is None
    np.testing.assert_array_equal(ds[1][0], imgs[1].transpose(2, 0, 1))  # reopens after close()


class ProbeDataset(ImageFolderDataset):
    """Also reports which process read the item and which process opened the ZIP handle it used."""

    def __getitem__(self, idx):
        image, label = super().__getitem__(idx)
        return image, label, os.getpid(), self._zipfile_pid, id(self._zipfile)


def _rss_mb(proc):
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


@pytest.fixture(scope="module")
def large_zip(tmp_path_factory):
    """A ZIP of 3000 NPY latents (4x32x32 float32, 16 KiB each: about 48 MiB in all); item i holds i."""
    n = 3000
    path = tmp_path_factory.mktemp("large") / "latents.zip"
    base = np.random.RandomState(0).randn(4, 32, 32).astype(np.float32)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for i in range(n):
            base[0, 0, 0] = i
            z.writestr(f"{i // 1000:05d}/img-mean-std-{i:08d}.npy", npy_bytes(base))
        z.writestr(
            "dataset.json", labels_json([[f"{i // 1000:05d}/img-mean-std-{i:08d}.npy", i % 10] for i in range(n)])
        )
    return str(path), n, os.path.getsize(path) / 2**20


def _two_epochs(path, cache):
    """Read the dataset twice through 2 persistent workers.

    Returns (items seen, {(worker pid, ZIP handle owner pid)}, main pid, RSS growth in MiB of the main
    process and its workers from the start of the first epoch to the end of the second). Each end is the
    median over three batches, so in-flight batches do not count as growth.
    """
    ds = ProbeDataset(path, cache=cache)
    ds[0]  # the main process opens a handle before the workers fork
    main_pid = os.getpid()
    loader = torch.utils.data.DataLoader(ds, batch_size=100, num_workers=2, persistent_workers=True, prefetch_factor=2)
    seen, pairs, rss = [], set(), []
    for _epoch in range(2):
        for images, labels, pids, zip_pids, _ids in loader:
            rss.append(_rss_mb(psutil.Process()))
            seen += images[:, 0, 0, 0].int().tolist()
            assert (labels.argmax(dim=1) == images[:, 0, 0, 0].long() % 10).all()
            pairs |= set(zip(pids.tolist(), zip_pids.tolist()))
    del loader
    assert ds._zipfile_pid == main_pid
    return seen, pairs, main_pid, float(np.median(rss[-3:]) - np.median(rss[:3]))


@pytest.mark.slow
def test_dataloader_workers_own_handles_and_flat_memory(large_zip):
    path, n, size_mb = large_zip
    seen, pairs, main_pid, growth = _two_epochs(path, cache=False)
    assert sorted(seen) == sorted(list(range(n)) * 2)
    worker_pids = {pid for pid, _ in pairs}
    assert len(worker_pids) == 2 and main_pid not in worker_pids
    assert all(pid == zip_pid for pid, zip_pid in pairs)  # every read used a handle its own process opened
    # Memory stays flat: far less growth than the ~48 MiB read twice.
    assert size_mb > 40
    assert growth < 12, f"RSS grew by {growth:.1f} MiB over two epochs of a {size_mb:.0f} MiB dataset"


@pytest.mark.slow
def test_dataloader_memory_check_detects_caching(large_zip):
    # The same measurement with cache=True must see the dataset pile up in the workers' memory:
    # evidence that the bound above is meaningful.
    path, n, size_mb = large_zip
    seen, _pairs, _main_pid, growth = _two_epochs(path, cache=True)
    assert sorted(seen) == sorted(list(range(n)) * 2)
    assert growth > 0.6 * size_mb
