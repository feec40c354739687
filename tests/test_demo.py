"""Tests of the main job (scripts/demo.sh) and its helpers: the whole pipeline at a small size, the
data choice (Fashion-MNIST from Debian's package, or scikit-learn's digits as the fallback), the
IDX reader against hand-written files, and the grid layout against its stated rule."""

import gzip
import json
import os
import re
import struct
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

from tests.conftest import REPO_ROOT, subprocess_env

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import demo_data  # noqa: E402
import demo_grid  # noqa: E402
import demo_progress  # noqa: E402

FASHION_NAMES = [
    "0-tshirt",
    "1-trouser",
    "2-pullover",
    "3-dress",
    "4-coat",
    "5-sandal",
    "6-shirt",
    "7-sneaker",
    "8-bag",
    "9-ankle-boot",
]
DIGIT_NAMES = ["0-zero", "1-one", "2-two", "3-three", "4-four", "5-five", "6-six", "7-seven", "8-eight", "9-nine"]


def write_idx(path, array):
    """IDX by hand: magic 0x00000800 + ndim, big-endian uint32 sizes, raw bytes; gzipped."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_root(root, per_class=2):
    """A Fashion-MNIST folder with per_class 28x28 images of each class; image i is filled with i."""
    os.makedirs(root, exist_ok=True)
    labels = np.repeat(np.arange(10), per_class)[::-1].copy()  # not sorted by label
    images = np.stack([np.full([28, 28], i, dtype=np.uint8) for i in range(len(labels))])
    images[:, 0, :] = 255  # not constant, so resampling would show
    write_idx(os.path.join(root, "train-images-idx3-ubyte.gz"), images)
    write_idx(os.path.join(root, "train-labels-idx1-ubyte.gz"), labels)
    return images, labels


# ----------------------------------------------------------------------------
# The whole pipeline at a small size.


@pytest.mark.slow
def test_demo_small_pipeline(tmp_path):
    """DEMO_SMALL=1 runs every step with the project's CLIs and leaves every output it names.
    Fashion-MNIST is used where the Debian package is installed, else the digits fallback."""
    have_fashion = demo_data.fashion_mnist_available()
    out = tmp_path / "out"
    env = subprocess_env(DEMO_SMALL="1", DEMO_OUT=str(out), DEMO_DATA="auto", DEMO_APT="0", PYTHON=sys.executable)
    env.pop("DEMO_THREADS", None)  # exercise the thread measurement too
    if not have_fashion:
        env["DEMO_FASHION_ROOT"] = str(tmp_path / "no-fashion-mnist")
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "demo.sh")],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    log = proc.stdout
    assert proc.returncode == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]

    # The script says which data it used, and the class folders match.
    if have_fashion:
        assert "Data: Fashion-MNIST" in log
        names = FASHION_NAMES
    else:
        assert "Data: scikit-learn digits (fallback" in log
        names = DIGIT_NAMES
    assert sorted(os.listdir(out / "images")) == names
    for name in names:
        assert len(os.listdir(out / "images" / name)) == 20
    assert re.search(r"OMP_NUM_THREADS=[12]\)", log)

    # dataset_tool.py convert: 200 labelled 16x16 RGB PNGs, label = class folder index.
    with zipfile.ZipFile(out / "dataset.zip") as z:
        labels = json.loads(z.read("dataset.json"))["labels"]
        assert len(labels) == 200
        assert np.bincount([label for _, label in labels]).tolist() == [20] * 10
        with z.open(labels[0][0]) as f:
            assert PIL.Image.open(f).size == (16, 16)

    # train_edm2.py: options, snapshots of both EMA profiles at 1 kimg, a checkpoint.
    run = out / "run"
    assert json.loads((run / "training_options.json").read_text())
    for std in ["0.050", "0.100"]:
        assert (run / f"network-snapshot-0000001-{std}.pkl").is_file()
    assert (run / "training-state-0000001.pt").is_file()

    # Watching the run: TensorBoard logs, the grid of the untrained net (--grid-at-start, 4 classes x 1 seed),
    # at 1 kimg a grid or the line saying that it would cost more than its share of so short a training,
    # and the progress picture of the grids there are.
    assert [n for n in os.listdir(run) if n.startswith("events.out.tfevents")]
    grids = sorted(n for n in os.listdir(run) if n.startswith("samples-"))
    assert grids[0] == "samples-0000000.png" and grids[1:] in ([], ["samples-0000001.png"])
    assert grids[1:] or "Sample grid at kimg 1 skipped" in log
    size = demo_progress.progress_size(len(grids), 1 * 18 + 2, 4 * 18 + 2)
    assert PIL.Image.open(out / "progress.png").size == size
    assert f"tensorboard --logdir {out}/run" in log

    # reconstruct_phema.py: the sigma_rel 0.100 profile at the last snapshot, a conditional 16x16 net.
    phema = out / "phema" / "phema-0000001-0.100.pkl"
    assert phema.is_file()
    from generate_images import load_network_pickle

    net = load_network_pickle(str(phema), verbose=False)["ema"]
    assert (net.img_resolution, net.img_channels, net.label_dim) == (16, 3, 10)

    # The grid: 10 rows x 2 columns of 16x16 images enlarged 4x, a 2-pixel gap around and between
    # cells, and a 100-pixel label column: width 100 + 2*(64+2) + 2, height 10*(64+2) + 2.
    grid = PIL.Image.open(out / "grid.png")
    assert grid.size == (100 + 2 * 66 + 2, 10 * 66 + 2)
    pixels = np.asarray(grid.convert("L"))
    assert (pixels[:, :100] < 128).any()  # the class names are drawn

    # generate_images.py CLI: seeds 0-1.
    samples = sorted(os.listdir(out / "samples"))
    assert samples == ["000000.png", "000001.png"]
    assert PIL.Image.open(out / "samples" / samples[0]).size == (16, 16)

    # The summary names every output.
    summary = log[log.index("Outputs:") :]
    for path in [out / "dataset.zip", run, phema, out / "grid.png"]:
        assert str(path) in summary


def test_demo_rejects_unknown_data(tmp_path):
    env = subprocess_env(DEMO_DATA="mnist", DEMO_OUT=str(tmp_path / "out"))
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "demo.sh")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "DEMO_DATA must be auto, fashion-mnist or digits" in proc.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------
# Data.


def test_read_idx_matches_hand_written_file(tmp_path):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    write_idx(tmp_path / "x.gz", array)
    np.testing.assert_array_equal(demo_data.read_idx(str(tmp_path / "x.gz")), array)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")  # float data: not supported
    with pytest.raises(ValueError, match="not an IDX file"):
        demo_data.read_idx(str(tmp_path / "bad"))


def test_fashion_mnist_tree_from_idx_files(tmp_path):
    """Balanced subset, class folders in label order, pixels written unchanged."""
    root = tmp_path / "fashion"
    images, labels = fake_fashion_root(root, per_class=3)
    info = demo_data.make_demo_images(str(tmp_path / "tree"), data="auto", per_class=2, fashion_root=str(root))
    assert info["data"] == "fashion-mnist" and info["num_images"] == 20 and info["resolution"] == 28
    assert sorted(os.listdir(tmp_path / "tree")) == FASHION_NAMES
    for label, name in enumerate(FASHION_NAMES):
        files = sorted(os.listdir(tmp_path / "tree" / name))
        assert len(files) == 2
        for file in files:
            image = np.asarray(PIL.Image.open(tmp_path / "tree" / name / file))
            i = int(image[1, 1])  # the fill value is the image's index in the IDX file
            assert labels[i] == label
            np.testing.assert_array_equal(image, images[i])
    assert not (tmp_path / "tree.tmp").exists()


def test_auto_falls_back_to_digits_and_says_so(tmp_path):
    result = CliRunner().invoke(
        demo_data.main,
        ["--dest", str(tmp_path / "tree"), "--per-class", "3", "--fashion-root", str(tmp_path / "missing")],
    )
    assert result.exit_code == 0, result.output
    assert "Data: scikit-learn digits (fallback: Fashion-MNIST is not installed)" in result.output
    assert sorted(os.listdir(tmp_path / "tree")) == DIGIT_NAMES

    # Every image is one of scikit-learn's digits of that class, intensities 0..16 scaled to 0..255.
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label, name in enumerate(DIGIT_NAMES):
        expected = {np.rint(d * 255 / 16).astype(np.uint8).tobytes() for d in digits.images[digits.target == label]}
        files = os.listdir(tmp_path / "tree" / name)
        assert len(files) == 3
        for file in files:
            image = np.asarray(PIL.Image.open(tmp_path / "tree" / name / file))
            assert image.shape == (8, 8) and image.tobytes() in expected


def test_explicit_fashion_mnist_missing_is_one_line_error(tmp_path):
    result = CliRunner().invoke(
        demo_data.main,
        ["--dest", str(tmp_path / "tree"), "--data", "fashion-mnist", "--fashion-root", str(tmp_path / "missing")],
    )
    assert result.exit_code != 0
    assert result.output.startswith("Error: Fashion-MNIST is not installed")
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "tree").exists()


# ----------------------------------------------------------------------------
# Grid.


def test_tile_grid_layout(tmp_path):
    """Each cell holds its image enlarged by nearest neighbour at the position the layout rule gives."""
    rng = np.random.RandomState(0)
    rows = [rng.randint(0, 256, size=[3, 4, 4, 3]).astype(np.uint8) for _ in range(2)]
    scale, pad, label_width = 3, 2, 50
    grid = demo_grid.tile_grid(rows, ["a", "b"], scale=scale, pad=pad, label_width=label_width)
    assert grid.size == (50 + 3 * (12 + 2) + 2, 2 * (12 + 2) + 2)
    assert grid.size == demo_grid.grid_size(2, 3, 4, scale=scale, pad=pad, label_width=label_width)
    pixels = np.asarray(grid)
    for r in range(2):
        for c in range(3):
            y, x = pad + r * 14, label_width + pad + c * 14
            expected = rows[r][c].repeat(scale, axis=0).repeat(scale, axis=1)
            np.testing.assert_array_equal(pixels[y : y + 12, x : x + 12], expected)
    assert (pixels[:, :label_width] < 128).any()  # labels drawn


def test_class_names_from_folder_or_list(tmp_path):
    for name in ["1-b", "0-a", "10-c"]:
        (tmp_path / name).mkdir()
    (tmp_path / "file.txt").write_text("")
    assert demo_grid.class_names_from(str(tmp_path)) == ["0-a", "1-b", "10-c"]
    assert demo_grid.class_names_from("cat, dog") == ["cat", "dog"]
    assert demo_data.class_folder_names(["a"] * 11)[:2] == ["00-a", "01-a"]
