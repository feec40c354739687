"""Tests for dataset_tool.py: convert (sources, labels, transforms, output format), encode/decode with a tiny
local VAE, and the one-line errors that leave nothing behind."""

import io
import json
import os
import struct
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
from tests.conftest import REPO_ROOT, assert_one_line_error, subprocess_env

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)

# ----------------------------------------------------------------------------
# Helpers.


def solid(h, w, color):
    img = np.zeros([h, w, 3], dtype=np.uint8)
    img[:] = color
    return img


def save(path, img, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(img).save(path, **kwargs)


def random_image(seed, h=16, w=16):
    return np.random.RandomState(seed).randint(0, 256, [h, w, 3]).astype(np.uint8)


def run(*args, env=None):
    """Run the CLI in-process; returns click's Result."""
    return CliRunner().invoke(dataset_tool.cmdline, [str(a) for a in args], env=env)


def read_dataset(path):
    """{name: bytes} of a ZIP or folder dataset."""
    if str(path).endswith(".zip"):
        with zipfile.ZipFile(path) as z:
            return {n: z.read(n) for n in z.namelist()}
    out = {}
    for root, _dirs, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            out[os.path.relpath(full, path).replace(os.sep, "/")] = open(full, "rb").read()
    return out


def decode_png(data):
    return np.array(PIL.Image.open(io.BytesIO(data)))


def png_idat_size(data):
    """Total size of the compressed pixel stream (IDAT chunks) of a PNG."""
    pos, total = 8, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IDAT":
            total += length
        pos += 12 + length
    return total


def convert_one(tmp_path, img, *options):
    """Convert a single image with the given options; returns the output pixels."""
    src = tmp_path / "one"
    save(str(src / "x.png"), img)
    dest = tmp_path / "one.zip"
    result = run("convert", "--source", src, "--dest", dest, *options)
    assert result.exit_code == 0, result.output
    files = read_dataset(dest)
    return decode_png(files["00000/img00000000.png"])


# ----------------------------------------------------------------------------
# 1. convert: sources, labels, output format.


def test_convert_folder_with_dataset_json_to_zip(tmp_path):
    src = tmp_path / "src"
    names = ["b/x/2.png", "a/1.png", "a/0.jpg", "top.png"]  # nested folders, mixed formats
    imgs = {n: random_image(i) for i, n in enumerate(names)}
    for n, img in imgs.items():
        save(str(src / n), img, **({"quality": 100} if n.endswith(".jpg") else {}))
    labels = {"a/0.jpg": 3, "a/1.png": 0, "b/x/2.png": 7, "top.png": 1}
    (src / "dataset.json").write_text(json.dumps({"labels": [[k, v] for k, v in labels.items()]}))
    (src / "notes.txt").write_text("not an image")

    dest = tmp_path / "out" / "data.zip"
    result = run("convert", "--source", src, "--dest", dest)
    assert result.exit_code == 0, result.output

    order = sorted(names)  # inputs are numbered in sorted order of their relative paths
    expected_names = [f"00000/img{i:08d}.png" for i in range(len(order))]
    with zipfile.ZipFile(dest) as z:
        assert z.namelist() == expected_names + ["dataset.json"]
        assert all(info.compress_type == zipfile.ZIP_STORED for info in z.infolist())
        for name, src_name in zip(expected_names, order):
            data = z.read(name)
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
            pixels = decode_png(data)
            if src_name.endswith(".png"):
                np.testing.assert_array_equal(pixels, imgs[src_name])
            else:  # JPEG: whatever Pillow decodes from the source file
                np.testing.assert_array_equal(pixels, np.array(PIL.Image.open(src / src_name).convert("RGB")))
            # compress_level=0: the pixel stream is at least as large as the raw filtered rows.
            assert png_idat_size(data) >= 16 * (16 * 3 + 1)
        meta = json.loads(z.read("dataset.json"))
    assert meta == {"labels": [[n, labels[s]] for n, s in zip(expected_names, order)]}


def test_convert_labels_from_toplevel_folders_to_folder(tmp_path):
    src = tmp_path / "src"
    layout = {"dog/1.png": 1, "cat/a/0.png": 0, "eel/9.png": 2, "cat/z.png": 0}
    for i, n in enumerate(layout):
        save(str(src / n), random_image(i))
    dest = tmp_path / "dest"
    dest.mkdir()  # an existing empty folder is fine
    result = run("convert", "--source", src, "--dest", dest)
    assert result.exit_code == 0, result.output
    files = read_dataset(dest)
    order = sorted(layout)
    assert sorted(files) == sorted([f"00000/img{i:08d}.png" for i in range(4)] + ["dataset.json"])
    meta = json.loads(files["dataset.json"])
    assert meta["labels"] == [[f"00000/img{i:08d}.png", layout[n]] for i, n in enumerate(order)]
    for i, n in enumerate(order):
        np.testing.assert_array_equal(decode_png(files[f"00000/img{i:08d}.png"]), random_image(list(layout).index(n)))
    # No leftovers beside the destination.
    assert sorted(os.listdir(tmp_path)) == ["dest", "src"]


def test_convert_single_folder_and_partial_labels_give_null(tmp_path):
    # One top-level folder: no labels.
    src = tmp_path / "one"
    for i in range(2):
        save(str(src / "only" / f"{i}.png"), random_image(i))
    assert run("convert", "--source", src, "--dest", tmp_path / "a.zip").exit_code == 0
    assert json.loads(read_dataset(tmp_path / "a.zip")["dataset.json"]) == {"labels": None}
    # dataset.json that labels only some images: null, since not every image has one.
    src = tmp_path / "partial"
    for i in range(3):
        save(str(src / f"{i}.png"), random_image(i))
    (src / "dataset.json").write_text(json.dumps({"labels": [["0.png", 1], ["2.png", 0]]}))
    assert run("convert", "--source", src, "--dest", tmp_path / "b.zip").exit_code == 0
    assert json.loads(read_dataset(tmp_path / "b.zip")["dataset.json"]) == {"labels": None}


def test_convert_from_zip_with_float_labels_and_max_images(tmp_path):
    src = tmp_path / "src.zip"
    imgs = [random_image(i, 8, 8) for i in range(5)]
    labels = [[f"imgs/{i}.png", [0.5 * i, -1.0]] for i in range(5)]
    with zipfile.ZipFile(src, "w") as z:
        for i in reversed(range(5)):  # stored out of order: the tool sorts names
            buf = io.BytesIO()
            PIL.Image.fromarray(imgs[i]).save(buf, format="png")
            z.writestr(f"imgs/{i}.png", buf.getvalue())
        z.writestr("dataset.json", json.dumps({"labels": labels}))
    dest = tmp_path / "dest"
    result = run("convert", "--source", src, "--dest", dest, "--max-images", 3)
    assert result.exit_code == 0, result.output
    files = read_dataset(dest)
    assert sorted(files) == ["00000/img00000000.png", "00000/img00000001.png", "00000/img00000002.png", "dataset.json"]
    for i in range(3):
        np.testing.assert_array_equal(decode_png(files[f"00000/img{i:08d}.png"]), imgs[i])
    assert json.loads(files["dataset.json"])["labels"] == [[f"00000/img{i:08d}.png", [0.5 * i, -1.0]] for i in range(3)]


def test_convert_grayscale_and_rgba_become_rgb(tmp_path):
    src = tmp_path / "src"
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    save(str(src / "g.png"), gray)
    rgba = np.dstack([random_image(1, 8, 8), np.full([8, 8], 255, np.uint8)])
    save(str(src / "r.png"), rgba)
    assert run("convert", "--source", src, "--dest", tmp_path / "o.zip").exit_code == 0
    files = read_dataset(tmp_path / "o.zip")
    np.testing.assert_array_equal(decode_png(files["00000/img00000000.png"]), np.stack([gray] * 3, axis=2))
    np.testing.assert_array_equal(decode_png(files["00000/img00000001.png"]), rgba[:, :, :3])


def symlink_or_skip(target, link):
    try:
        os.symlink(target, link, target_is_directory=os.path.isdir(target))
    except (OSError, NotImplementedError):
        pytest.skip("this system cannot create symbolic links")


def test_convert_follows_symlinked_class_folders_and_files(tmp_path):
    # The reference lists the source with os.scandir's is_dir()/is_file(), which follow links.
    elsewhere = tmp_path / "elsewhere"
    save(str(elsewhere / "dogs" / "d0.png"), random_image(0))
    save(str(elsewhere / "dogs" / "d1.png"), random_image(1))
    save(str(elsewhere / "lone.png"), random_image(2))
    src = tmp_path / "src"
    save(str(src / "cat" / "c0.png"), random_image(3))
    symlink_or_skip(str(elsewhere / "dogs"), str(src / "dog"))  # a linked class folder
    symlink_or_skip(str(elsewhere / "lone.png"), str(src / "cat" / "c1.png"))  # a linked file
    symlink_or_skip(str(src), str(src / "cat" / "loop"))  # a link back up: listed once, not forever
    symlink_or_skip(str(tmp_path / "nowhere.png"), str(src / "cat" / "broken.png"))  # dangling: ignored
    dest = tmp_path / "o.zip"
    result = run("convert", "--source", src, "--dest", dest)
    assert result.exit_code == 0, result.output
    files = read_dataset(dest)
    order = [("cat/c0.png", 3, 0), ("cat/c1.png", 2, 0), ("dog/d0.png", 0, 1), ("dog/d1.png", 1, 1)]
    assert sorted(files) == [f"00000/img{i:08d}.png" for i in range(4)] + ["dataset.json"]
    for i, (_name, seed, _label) in enumerate(order):
        np.testing.assert_array_equal(decode_png(files[f"00000/img{i:08d}.png"]), random_image(seed))
    assert json.loads(files["dataset.json"])["labels"] == [
        [f"00000/img{i:08d}.png", label] for i, (_n, _s, label) in enumerate(order)
    ]


def test_list_folder_is_shared_and_lists_a_folder_linked_twice_twice(tmp_path):
    import training.dataset

    assert dataset_tool.list_folder is training.dataset.list_folder  # one listing, one extension list
    assert dataset_tool.image_extensions is training.dataset.image_extensions
    save(str(tmp_path / "a" / "x.png"), random_image(0))
    symlink_or_skip(str(tmp_path / "a"), str(tmp_path / "b"))  # not a loop: the reference lists it again
    symlink_or_skip(str(tmp_path / "a"), str(tmp_path / "a" / "self"))  # a loop
    assert dataset_tool.list_folder(str(tmp_path)) == ["a/x.png", "b/x.png"]


@pytest.mark.parametrize("kind", ["dir", "zip"])
def test_dataset_json_labelling_absent_files_is_an_error(tmp_path, kind):
    imgs = {f"{i}.png": random_image(i) for i in range(2)}
    for absent, fragments in [
        (["ghost.png"], ["1 file", "ghost.png"]),
        ([f"g{i}.png" for i in range(7)], ["7 file", "g0.png", "g4.png", "..."]),
    ]:
        entries = [[n, 0] for n in imgs] + [[n, 1] for n in absent]
        if kind == "dir":
            src = tmp_path / f"src{len(absent)}"
            for n, img in imgs.items():
                save(str(src / n), img)
            (src / "dataset.json").write_text(json.dumps({"labels": entries}))
        else:
            src = tmp_path / f"src{len(absent)}.zip"
            with zipfile.ZipFile(src, "w") as z:
                for n, img in imgs.items():
                    z.writestr(n, dataset_tool.png_bytes(img))
                z.writestr("dataset.json", json.dumps({"labels": entries}))
        before = listing(tmp_path)
        error = assert_one_line_error(
            run("convert", "--source", src, "--dest", tmp_path / "o.zip"), "dataset.json", *fragments
        )
        assert "g5.png" not in error  # the first five only
        assert listing(tmp_path) == before
    # A label for a file that is there but not an image is just as lost.
    src = tmp_path / "notes"
    save(str(src / "a.png"), random_image(0))
    (src / "a.txt").write_text("x")
    (src / "dataset.json").write_text(json.dumps({"labels": [["a.png", 0], ["a.txt", 1]]}))
    with pytest.raises(OSError, match="a.txt"):
        dataset_tool.convert_dataset(str(src), str(tmp_path / "n.zip"))


def test_dataset_writer_uses_the_atomic_temp_name_scheme(tmp_path):
    import re

    for dest in ["o.zip", "o"]:
        with dataset_tool.DatasetWriter(str(tmp_path / dest)) as out:
            out.write("00000/a.txt", "hello")
            temps = [n for n in os.listdir(tmp_path) if re.fullmatch(rf"\.{dest}\.[0-9a-f]{{12}}\.tmp", n)]
            assert len(temps) == 1 and not os.path.exists(tmp_path / dest)
        assert read_dataset(tmp_path / dest) == {"00000/a.txt": b"hello"}
        with pytest.raises(RuntimeError):
            with dataset_tool.DatasetWriter(str(tmp_path / f"failed-{dest}")) as out:
                out.write("00000/a.txt", "hello")
                raise RuntimeError("interrupted")
    assert listing(tmp_path) == ["o", "o.zip"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "o.zip").st_mode & 0o777 == 0o666 & ~umask  # the usual permissions
    (tmp_path / "empty").mkdir()
    with dataset_tool.DatasetWriter(str(tmp_path / "empty")) as out:  # an empty folder is replaced
        out.write("x.txt", b"1")
    assert read_dataset(tmp_path / "empty") == {"x.txt": b"1"}


def test_library_functions_raise_plain_exceptions(tmp_path):
    import click

    save(str(tmp_path / "src" / "a.png"), random_image(0))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    cases = [
        (FileNotFoundError, lambda: dataset_tool.convert_dataset(str(tmp_path / "nope"), str(tmp_path / "o.zip"))),
        (ValueError, lambda: dataset_tool.DatasetWriter(str(tmp_path / "full"))),
        (ValueError, lambda: dataset_tool.convert_dataset(str(tmp_path / "src"), str(tmp_path / "full"))),
        (ValueError, lambda: dataset_tool.make_transform("center-crop", None)),
        (ValueError, lambda: dataset_tool.make_transform("stretch", (16, 16))),
        (ValueError, lambda: dataset_tool.make_transform(None, (16, 8))),
        (ValueError, lambda: dataset_tool.parse_resolution("16")),
        (
            ValueError,
            lambda: dataset_tool.convert_dataset(
                str(tmp_path / "src"), str(tmp_path / "o.zip"), resolution=(8, 16), transform="center-crop-wide"
            ),
        ),
    ]
    for expected, call in cases:
        with pytest.raises(expected) as info:
            call()
        assert not isinstance(info.value, click.ClickException)
    assert listing(tmp_path) == ["full", "src"]


def test_destination_is_checked_before_the_vae_is_loaded(tmp_path, good_src, monkeypatch):
    import training.encoders

    def no_load(*args, **kwargs):
        raise AssertionError("the VAE was loaded before the arguments were checked")

    monkeypatch.setattr(training.encoders, "load_stability_vae", no_load)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert_one_line_error(
        run("encode", "--model-url", tmp_path / "no-such-vae", "--source", good_src, "--dest", full), "empty"
    )
    assert_one_line_error(run("encode", "--source", tmp_path / "nope", "--dest", tmp_path / "l.zip"), "does not exist")
    assert_one_line_error(run("decode", "--source", good_src, "--dest", tmp_path / "d.zip"), ".npy")
    assert_one_line_error(run("decode", "--source", good_src, "--dest", good_src / "0.png"), "not a folder")
    assert listing(tmp_path) == ["full", "src"]


def test_parse_resolution_forms():
    assert dataset_tool.parse_resolution("512x256") == (512, 256)
    assert dataset_tool.parse_resolution("64,32") == (64, 32)
    for bad in ["512", "512x", "ax3", "0x0", "1x2x3"]:
        with pytest.raises(Exception, match="resolution|WxH|positive"):
            dataset_tool.parse_resolution(bad)


# ----------------------------------------------------------------------------
# 2. Transforms on images whose crop box and scale show in the output.


def test_plain_resolution_resizes_the_whole_image(tmp_path):
    img = np.concatenate([solid(16, 16, RED), solid(16, 16, BLUE)], axis=1)  # 32 wide, 16 high
    out = convert_one(tmp_path, img, "--resolution", "16x16")
    assert out.shape == (16, 16, 3)
    # Both halves survive, squeezed to 8 columns each (Lanczos ringing only near the seam).
    assert (out[:, :5] == RED).all() and (out[:, 11:] == BLUE).all()
    expected = np.array(PIL.Image.fromarray(img).resize((16, 16), PIL.Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(out, expected)


def test_center_crop_takes_the_middle_square(tmp_path):
    img = solid(32, 48, RED)  # 48 wide: the centred square is columns 8..40
    img[:, 8:40] = GREEN
    img[:16, 8:24] = BLUE  # top-left quadrant of the square
    out = convert_one(tmp_path, img, "--resolution", "16x16", "--transform", "center-crop")
    assert out.shape == (16, 16, 3)
    assert not (out[..., 0] > 0).any()  # no red border made it in
    assert (out[:5, :5] == BLUE).all() and (out[11:, :] == GREEN).all() and (out[:, 11:] == GREEN).all()


def test_center_crop_wide_aspect_crops_the_output_aspect_and_letterboxes(tmp_path):
    # 64x48 input, 32x16 output (aspect 2:1): the band is the 32 middle rows 8..40 at full width.
    img = solid(48, 64, RED)
    img[8:40] = YELLOW
    img[12:36] = GREEN
    out = convert_one(tmp_path, img, "--resolution", "32x16", "--transform", "center-crop-wide-aspect")
    assert out.shape == (32, 32, 3)
    assert (out[:8] == 0).all() and (out[24:] == 0).all()  # black letterbox above and below
    band = out[8:24].astype(int)
    assert (band[..., 1] >= 250).all()  # green channel everywhere: no red rows were included
    assert (band[0, :, 0] > 200).all() and (band[-1, :, 0] > 200).all()  # yellow first and last rows
    assert (band[3:13, :, 0] <= 2).all()  # green middle (up to Lanczos ringing)
    expected = np.array(PIL.Image.fromarray(img[8:40]).resize((32, 16), PIL.Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(out[8:24], expected)


@pytest.mark.parametrize("transform", ["center-crop-wide", "center-crop-wide-aspect"])
def test_center_crop_wide_skips_small_and_too_wide_images_leaving_gaps(tmp_path, transform):
    src = tmp_path / "src"
    save(str(src / "a.png"), solid(48, 64, GREEN))
    save(str(src / "b.png"), solid(16, 16, RED))  # narrower than the output: skipped
    save(str(src / "c.png"), solid(48, 64, BLUE))
    save(str(src / "d.png"), solid(16, 128, RED))  # too wide for 2:1 (would need 64 rows): skipped
    (src / "dataset.json").write_text(json.dumps({"labels": [["a.png", 0], ["b.png", 1], ["c.png", 2], ["d.png", 3]]}))
    dest = tmp_path / "out.zip"
    result = run("convert", "--source", src, "--dest", dest, "--resolution", "32x16", "--transform", transform)
    assert result.exit_code == 0, result.output
    files = read_dataset(dest)
    assert sorted(files) == ["00000/img00000000.png", "00000/img00000002.png", "dataset.json"]
    assert (decode_png(files["00000/img00000002.png"])[8:24] == BLUE).all()
    assert json.loads(files["dataset.json"])["labels"] == [["00000/img00000000.png", 0], ["00000/img00000002.png", 2]]


def _dhariwal_reference(img, size, halvings):
    """ADM's recipe computed independently: numpy 2x2 means, then Pillow bicubic, then the centre crop."""
    y = img.astype(np.float64)
    for _ in range(halvings):
        h, w = y.shape[0] // 2 * 2, y.shape[1] // 2 * 2
        y = y[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    pil = PIL.Image.fromarray(np.floor(y + 0.5).astype(np.uint8))
    s = size / min(pil.size)
    arr = np.array(pil.resize(tuple(round(v * s) for v in pil.size), PIL.Image.Resampling.BICUBIC))
    cy, cx = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[cy : cy + size, cx : cx + size].astype(int)


def test_center_crop_dhariwal_halves_then_bicubic_then_crops(tmp_path):
    # 512x264 -> 64: the short side 264 >= 128 halves to 132, still >= 128 halves to 66, then bicubic
    # to 124x64 and the centred 64 columns.
    img = np.random.RandomState(0).randint(0, 256, [264, 512, 3]).astype(np.uint8)
    out = convert_one(tmp_path, img, "--resolution", "64x64", "--transform", "center-crop-dhariwal").astype(int)
    assert out.shape == (64, 64, 3)
    err = {n: np.abs(out - _dhariwal_reference(img, 64, n)) for n in range(4)}
    assert err[2].max() <= 4 and err[2].mean() < 1.5  # box-filter rounding differs by at most 1 level
    for n in (0, 1, 3):  # one halving more or less is far off
        assert err[n].mean() > 4 * err[2].mean()


def test_center_crop_dhariwal_crop_box(tmp_path):
    # Coloured borders wider than what the crop removes: red left/right 100 columns, blue top half.
    img = solid(264, 512, GREEN)
    img[:, :100] = RED
    img[:, 412:] = RED
    img[:132, 100:412] = BLUE
    out = convert_one(tmp_path, img, "--resolution", "64x64", "--transform", "center-crop-dhariwal").astype(int)
    assert (out[..., 0] == 0).all()  # the crop (source columns ~124..388) excludes the red borders
    assert (out[:30, :, 2] >= 250).all() and (out[34:, :, 1] >= 250).all()


def test_center_crop_dhariwal_small_image_is_upsampled(tmp_path):
    img = np.random.RandomState(1).randint(0, 256, [40, 60, 3]).astype(np.uint8)
    out = convert_one(tmp_path, img, "--resolution", "64x64", "--transform", "center-crop-dhariwal").astype(int)
    np.testing.assert_array_equal(out, _dhariwal_reference(img, 64, 0))


def _center_crop_wide_reference(img, width, height):
    """The reference's center-crop-wide, step by step: ch = round(width·h/w) rows (numpy's round half to
    even), skip if the image is narrower than width or ch < height, the centred ch rows, Pillow Lanczos
    to width x height, then the middle rows of a black width x width canvas."""
    ch = int(np.round(width * img.shape[0] / img.shape[1]))
    if img.shape[1] < width or ch < height:
        return None
    img = img[(img.shape[0] - ch) // 2 : (img.shape[0] + ch) // 2]
    img = np.array(PIL.Image.fromarray(img, "RGB").resize((width, height), PIL.Image.LANCZOS))
    canvas = np.zeros([width, width, 3], dtype=np.uint8)
    canvas[(width - height) // 2 : (width + height) // 2, :] = img
    return canvas


# (input height, input width, output width, output height): odd sizes, an input as wide as the output,
# a tall one, a square output, and ch = 16.5 / 17.5 where round-half-to-even decides (16, 18).
WIDE_CASES = [
    (48, 64, 32, 16),
    (37, 50, 32, 16),
    (24, 32, 32, 16),
    (100, 33, 32, 32),
    (80, 71, 16, 16),
    (33, 64, 32, 16),
    (35, 64, 32, 16),
    (64, 64, 32, 16),
]


@pytest.mark.parametrize("h,w,width,height", WIDE_CASES)
def test_center_crop_wide_is_the_references_pixels(h, w, width, height):
    img = random_image(h * w, h, w)
    expected = _center_crop_wide_reference(img, width, height)
    assert expected is not None
    np.testing.assert_array_equal(dataset_tool.center_crop_wide(width, height, img), expected)
    np.testing.assert_array_equal(dataset_tool.make_transform("center-crop-wide", (width, height))(img), expected)


def test_center_crop_wide_through_convert_and_its_skips(tmp_path):
    src = tmp_path / "src"
    shapes = [
        (48, 64),
        (21, 64),
        (37, 50),
        (30, 31),
        (33, 64),
    ]  # 21x64: ch = round(10.5) = 10 < 16, skipped; 31 < 32 wide, skipped
    imgs = [random_image(i, h, w) for i, (h, w) in enumerate(shapes)]
    for i, img in enumerate(imgs):
        save(str(src / f"{i}.png"), img)
    dest = tmp_path / "o.zip"
    result = run("convert", "--source", src, "--dest", dest, "--resolution", "32x16", "--transform", "center-crop-wide")
    assert result.exit_code == 0, result.output
    files = read_dataset(dest)
    kept = [i for i, img in enumerate(imgs) if _center_crop_wide_reference(img, 32, 16) is not None]
    assert kept == [0, 2, 4]
    assert sorted(files) == [f"00000/img{i:08d}.png" for i in kept] + ["dataset.json"]
    for i in kept:
        np.testing.assert_array_equal(
            decode_png(files[f"00000/img{i:08d}.png"]), _center_crop_wide_reference(imgs[i], 32, 16)
        )


def test_center_crop_wide_and_aspect_variant_differ_where_the_reference_stretches():
    # 64x48 -> 32x16: the reference takes 24 rows (a 64:24 band, stretched to 2:1); the aspect variant 32.
    img = random_image(3, 48, 64)
    ref = dataset_tool.center_crop_wide(32, 16, img)
    aspect = dataset_tool.center_crop_wide_aspect(32, 16, img)
    np.testing.assert_array_equal(
        aspect[8:24], np.array(PIL.Image.fromarray(img[8:40]).resize((32, 16), PIL.Image.LANCZOS))
    )
    assert np.abs(ref.astype(int) - aspect.astype(int)).mean() > 10
    # Where (w/width)^2 = h/height the reference's band has the output aspect: both agree.
    img = random_image(4, 64, 64)
    np.testing.assert_array_equal(
        dataset_tool.center_crop_wide(32, 16, img), dataset_tool.center_crop_wide_aspect(32, 16, img)
    )


# ----------------------------------------------------------------------------
# 5. Real photographs.


def test_convert_real_photos_center_crop_dhariwal(tmp_path):
    import skimage.data

    photos = {
        "astronaut": skimage.data.astronaut(),
        "chelsea": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
        "kamera": skimage.data.camera(),
    }  # camera is grayscale
    src = tmp_path / "photos"
    for name, img in photos.items():
        save(str(src / f"{name}.png"), img, compress_level=1)
    dest = tmp_path / "photos.zip"
    result = run(
        "convert", "--source", src, "--dest", dest, "--resolution", "64x64", "--transform", "center-crop-dhariwal"
    )
    assert result.exit_code == 0, result.output
    files = read_dataset(dest)
    for i, name in enumerate(sorted(photos)):
        out = decode_png(files[f"00000/img{i:08d}.png"]).astype(np.float64)
        assert out.shape == (64, 64, 3)
        # Compare with an independent downsampling of the centred square: area averaging.
        img = photos[name]
        img = np.stack([img] * 3, axis=2) if img.ndim == 2 else img
        h, w = img.shape[:2]
        s = min(h, w)
        square = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        ref = np.array(PIL.Image.fromarray(square).resize((64, 64), PIL.Image.Resampling.BOX)).astype(np.float64)
        assert np.abs(out - ref).mean() < 6, name  # a crop off-centre or mirrored is > 30 away
        if name == "kamera":
            assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert json.loads(files["dataset.json"]) == {"labels": None}


# ----------------------------------------------------------------------------
# 3. encode / decode with a tiny local VAE, on the CPU.


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
    )
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(str(path))
    return str(path), vae.eval()


@pytest.mark.slow
def test_encode_decode_roundtrip_on_cpu(tmp_path, tiny_vae):
    vae_path, vae = tiny_vae
    src = tmp_path / "pixels.zip"
    imgs = [random_image(i, 16, 16) for i in range(3)]
    with zipfile.ZipFile(src, "w") as z:
        for i, img in enumerate(imgs):
            z.writestr(f"00000/img{i:08d}.png", dataset_tool.png_bytes(img))
        z.writestr("dataset.json", json.dumps({"labels": [[f"00000/img{i:08d}.png", i % 2] for i in range(3)]}))

    latents = tmp_path / "latents.zip"
    result = run("encode", "--model-url", vae_path, "--source", src, "--dest", latents, "--batch", 2)
    assert result.exit_code == 0, result.output
    files = read_dataset(latents)
    names = [f"00000/img-mean-std-{i:08d}.npy" for i in range(3)]
    assert sorted(files) == names + ["dataset.json"]
    assert json.loads(files["dataset.json"])["labels"] == [[n, i % 2] for i, n in enumerate(names)]
    for name, img in zip(names, imgs):
        array = np.load(io.BytesIO(files[name]))
        assert array.dtype == np.float32 and array.shape == (8, 8, 8)  # the tiny VAE downsamples by 2
        # Independently: the diffusers VAE on pixels in [0, 1], posterior mean and std.
        with torch.no_grad():
            dist = vae.encode(torch.as_tensor(img).permute(2, 0, 1)[None].float() / 255).latent_dist
        np.testing.assert_allclose(array[:4], dist.mean[0].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(array[4:], dist.std[0].numpy(), rtol=1e-4, atol=1e-5)

    decoded = tmp_path / "decoded"
    result = run("decode", "--model-url", vae_path, "--source", latents, "--dest", decoded)
    assert result.exit_code == 0, result.output
    out = read_dataset(decoded)
    png_names = [f"00000/img{i:08d}.png" for i in range(3)]
    assert sorted(out) == png_names + ["dataset.json"]
    assert json.loads(out["dataset.json"])["labels"] == [[n, i % 2] for i, n in enumerate(png_names)]
    for name, png in zip(names, png_names):
        mean = torch.as_tensor(np.load(io.BytesIO(files[name]))[:4])[None]
        with torch.no_grad():
            ref = vae.decode(mean).sample  # decoding the mean: scale and bias cancel out
        ref = (ref.clamp(0, 1) * 255).to(torch.uint8)[0].permute(1, 2, 0).numpy().astype(int)
        pixels = decode_png(out[png]).astype(int)
        assert pixels.shape == (16, 16, 3)
        assert np.abs(pixels - ref).max() <= 1  # float rounding of the scale/bias round trip

    # --sample draws mean + randn*std: different pixels, reproducible for a seed.
    sampled = [tmp_path / f"sampled{k}.zip" for k in range(2)]
    for path in sampled:
        assert (
            run(
                "decode", "--model-url", vae_path, "--source", latents, "--dest", path, "--sample", "--seed", 5
            ).exit_code
            == 0
        )
    a, b = read_dataset(sampled[0]), read_dataset(sampled[1])
    assert a == b
    assert any(not np.array_equal(decode_png(a[n]), decode_png(out[n])) for n in png_names)


def test_final_latents_matches_encode_latents_scaling(tiny_vae):
    from training.encoders import StabilityVAEEncoder

    enc = StabilityVAEEncoder(vae_name=tiny_vae[0])
    mean_std = torch.randn([2, 8, 4, 4])
    mean_std[:, 4:] = 0  # zero std: the encoder's own draw equals the mean
    torch.testing.assert_close(dataset_tool.final_latents(enc, mean_std), enc.encode_latents(mean_std))
    noise = torch.randn([2, 4, 4, 4])
    mean_std[:, 4:] = 0.3
    expected = (mean_std[:, :4] + 0.3 * noise) * torch.tensor(enc.scale).reshape(1, -1, 1, 1) + torch.tensor(
        enc.bias
    ).reshape(1, -1, 1, 1)
    torch.testing.assert_close(dataset_tool.final_latents(enc, mean_std, sample=True, noise=noise), expected)


# ----------------------------------------------------------------------------
# 6. Bad input: one line, non-zero exit, nothing left behind.


@pytest.fixture
def good_src(tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        save(str(src / f"{i}.png"), random_image(i))
    return src


def listing(path):
    return sorted(os.listdir(path))


def test_error_missing_source(tmp_path):
    assert_one_line_error(run("convert", "--source", tmp_path / "nope", "--dest", tmp_path / "o.zip"), "does not exist")
    assert listing(tmp_path) == []


def test_error_source_not_a_zip(tmp_path):
    (tmp_path / "data.tar").write_bytes(b"x" * 100)
    assert_one_line_error(run("convert", "--source", tmp_path / "data.tar", "--dest", tmp_path / "o.zip"), ".zip")
    (tmp_path / "fake.zip").write_bytes(b"this is no zip archive")
    assert_one_line_error(run("convert", "--source", tmp_path / "fake.zip", "--dest", tmp_path / "o.zip"), "ZIP")
    assert listing(tmp_path) == ["data.tar", "fake.zip"]


def test_error_folder_without_images(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    assert_one_line_error(run("convert", "--source", tmp_path / "empty", "--dest", tmp_path / "o"), "No image")
    assert listing(tmp_path) == ["empty"]


def test_error_corrupt_image_names_it_and_leaves_nothing(tmp_path, good_src):
    (good_src / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # after 0.png was written
    for dest in ["o.zip", "o"]:
        assert_one_line_error(run("convert", "--source", good_src, "--dest", tmp_path / dest), "1.png")
        assert listing(tmp_path) == ["src"]


def test_error_non_square_or_non_power_of_two(tmp_path, good_src):
    assert_one_line_error(
        run("convert", "--source", good_src, "--dest", tmp_path / "o.zip", "--resolution", "16x8"), "square"
    )
    assert_one_line_error(
        run("convert", "--source", good_src, "--dest", tmp_path / "o.zip", "--resolution", "24x24"), "power of two"
    )
    assert_one_line_error(
        run(
            "convert",
            "--source",
            good_src,
            "--dest",
            tmp_path / "o.zip",
            "--resolution",
            "32x16",
            "--transform",
            "center-crop-dhariwal",
        ),
        "square",
    )
    # Without --resolution the first image decides.
    save(str(tmp_path / "wide" / "a.png"), solid(8, 16, RED))
    assert_one_line_error(run("convert", "--source", tmp_path / "wide", "--dest", tmp_path / "o.zip"), "square", "16x8")
    save(str(tmp_path / "odd" / "a.png"), solid(12, 12, RED))
    assert_one_line_error(run("convert", "--source", tmp_path / "odd", "--dest", tmp_path / "o.zip"), "power of two")
    assert listing(tmp_path) == ["odd", "src", "wide"]


def test_error_images_of_different_sizes(tmp_path, good_src):
    save(str(good_src / "2.png"), random_image(5, 32, 32))
    assert_one_line_error(run("convert", "--source", good_src, "--dest", tmp_path / "o.zip"), "2.png", "32x32", "16x16")
    assert listing(tmp_path) == ["src"]
    # --resolution makes them equal.
    assert run("convert", "--source", good_src, "--dest", tmp_path / "o.zip", "--resolution", "16x16").exit_code == 0


def test_error_non_empty_destination_folder(tmp_path, good_src):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    assert_one_line_error(run("convert", "--source", good_src, "--dest", dest), "empty")
    assert listing(dest) == ["keep.txt"] and listing(tmp_path) == ["dest", "src"]


def test_error_malformed_resolution_and_transform_without_resolution(tmp_path, good_src):
    for bad in ["16", "16x", "x16", "axb", "-16x16"]:
        assert_one_line_error(
            run("convert", "--source", good_src, "--dest", tmp_path / "o.zip", "--resolution", bad), "--resolution"
        )
    for transform in dataset_tool.TRANSFORMS:
        assert_one_line_error(
            run("convert", "--source", good_src, "--dest", tmp_path / "o.zip", "--transform", transform), "--resolution"
        )
    assert_one_line_error(
        run("convert", "--source", good_src, "--dest", tmp_path / "o.zip", "--transform", "stretch"), "--transform"
    )
    assert listing(tmp_path) == ["src"]


def test_error_encode_bad_model_and_decode_non_latents(tmp_path, good_src):
    assert_one_line_error(
        run("encode", "--model-url", tmp_path / "no-such-vae", "--source", good_src, "--dest", tmp_path / "l.zip"),
        "VAE",
    )
    assert_one_line_error(
        run("decode", "--model-url", tmp_path / "no-such-vae", "--source", good_src, "--dest", tmp_path / "d.zip"),
        ".npy",
    )
    assert listing(tmp_path) == ["src"]


@pytest.mark.slow
def test_error_under_torchrun(tmp_path, good_src):
    # torchrun sets WORLD_SIZE for every process it launches.
    assert_one_line_error(
        run("convert", "--source", good_src, "--dest", tmp_path / "o.zip", env={"WORLD_SIZE": "2"}), "torchrun"
    )
    assert listing(tmp_path) == ["src"]
    # As a real command: exit status 1, one line on stderr, no traceback.
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "dataset_tool.py"),
            "convert",
            "--source",
            str(good_src),
            "--dest",
            str(tmp_path / "o.zip"),
        ],
        env=subprocess_env(WORLD_SIZE="2"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "torchrun" in proc.stderr and "Traceback" not in proc.stderr
    assert listing(tmp_path) == ["src"]
