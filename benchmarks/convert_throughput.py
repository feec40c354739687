"""Throughput of `dataset_tool.py convert` (images/s) on a folder of JPEG-compressed photo crops.

The input is made from the photographs that scikit-image ships (they load offline): random crops of
128-320 pixels, saved as JPEG (quality 90) in a temporary folder, a few thousand of them. Each row
times one full conversion (listing, decoding, transform, PNG encoding, writing, final rename); the
first row times only decoding the inputs, the floor that any conversion pays.

    python benchmarks/convert_throughput.py --count 3000
"""

import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # keep the table readable
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import click  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402

import dataset_tool  # noqa: E402


def make_jpeg_folder(folder: str, count: int, seed: int = 0) -> float:
    """Write `count` JPEG crops of the scikit-image photos into folder/<class>/; returns their size in MiB."""
    import skimage.data

    photos = [
        skimage.data.astronaut(),
        skimage.data.coffee(),
        skimage.data.chelsea(),
        skimage.data.rocket(),
        np.stack([skimage.data.camera()] * 3, axis=2),
    ]
    rng = np.random.RandomState(seed)
    total = 0
    for i in range(count):
        k = i % len(photos)
        img = photos[k]
        h, w = img.shape[:2]
        ch, cw = rng.randint(128, min(h, 320) + 1), rng.randint(128, min(w, 320) + 1)
        y, x = rng.randint(0, h - ch + 1), rng.randint(0, w - cw + 1)
        path = os.path.join(folder, f"class{k}", f"{i:06d}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        PIL.Image.fromarray(np.ascontiguousarray(img[y : y + ch, x : x + cw])).save(path, quality=90)
        total += os.path.getsize(path)
    return total / 2**20


def time_decode_only(folder: str) -> tuple:
    src = dataset_tool.Source(folder, dataset_tool.image_extensions())
    t0 = time.perf_counter()
    for f in src.files:
        src.read_image(f)
    return len(src.files), time.perf_counter() - t0


@click.command()
@click.option("--count", help="Number of JPEG inputs", type=click.IntRange(min=1), default=3000, show_default=True)
@click.option("--workdir", help="Where to put the temporary files (default: system temp)", type=str, default=None)
def main(count: int, workdir: str) -> None:
    """Print a table of convert throughputs."""
    tmp = tempfile.mkdtemp(dir=workdir, prefix="convert-bench-")
    try:
        src = os.path.join(tmp, "jpegs")
        size_mb = make_jpeg_folder(src, count)
        print(f"{count} JPEG crops (128-320 px, quality 90), {size_mb:.1f} MiB, {os.cpu_count()} CPUs")
        runs = [
            ("decode JPEG only (no output)", None, None, None),
            ("center-crop-dhariwal 64x64 -> ZIP", "center-crop-dhariwal", (64, 64), "a.zip"),
            ("center-crop-dhariwal 64x64 -> folder", "center-crop-dhariwal", (64, 64), "b"),
            ("center-crop 128x128 -> ZIP", "center-crop", (128, 128), "c.zip"),
            ("center-crop-wide 128x64 -> ZIP", "center-crop-wide", (128, 64), "d.zip"),
        ]
        print()
        print("| run | images | seconds | images/s |")
        print("| --- | ---: | ---: | ---: |")
        for label, transform, resolution, dest in runs:
            if dest is None:
                n, seconds = time_decode_only(src)
            else:
                t0 = time.perf_counter()
                written = dataset_tool.convert_dataset(
                    src, os.path.join(tmp, dest), transform=transform, resolution=resolution
                )
                seconds = time.perf_counter() - t0
                n = count  # throughput counts inputs; center-crop-wide skips the crops too wide for 2:1
                if written != count:
                    label += f" ({count - written} skipped)"
            print(f"| {label} | {n} | {seconds:.2f} | {n / seconds:.0f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
