"""Write the demo's labelled image folder: real images that need no download.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (IDX files, gzipped, under
``/usr/share/datasets/fashion-mnist/``); scikit-learn's bundled 8x8 digits are the fallback. The
output is one top-level folder per class whose names sort in label order (``0-tshirt``, ...,
``9-ankle-boot``), which is how ``dataset_tool.py convert`` assigns labels. A balanced subset of
``--per-class`` images per class keeps the demo small enough for a CPU.

    python scripts/demo_data.py --dest demo-output/images --data auto --per-class 600
"""

import gzip
import os
import shutil
import struct
import sys

import click
import numpy as np
import PIL.Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dnnlib  # noqa: E402  (the repository root is on the path only from here on)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = "tshirt trouser pullover dress coat sandal shirt sneaker bag ankle-boot".split()
DIGITS_CLASSES = "zero one two three four five six seven eight nine".split()
DATA_CHOICES = ["auto", "fashion-mnist", "digits"]

# Readers: each returns (images [N, H, W] uint8, labels [N] int64, class names).


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzipped): big-endian magic 0x0000TTDD, then DD dimension
    sizes as big-endian uint32, then the data. Only unsigned bytes (TT = 0x08) occur in MNIST."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {array.size} values, its header says {shape}")
    return array.reshape(shape)


_FASHION_MNIST_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]


def fashion_mnist_available(root: str = FASHION_MNIST_DIR) -> bool:
    return all(os.path.isfile(os.path.join(root, name)) for name in _FASHION_MNIST_FILES)


def load_fashion_mnist(root: str = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The 60 000 training images of Fashion-MNIST (28x28 grayscale)."""
    images, labels = (read_idx(os.path.join(root, name)) for name in _FASHION_MNIST_FILES)
    labels = labels.astype(np.int64)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"unexpected Fashion-MNIST shapes {images.shape} and {labels.shape}")
    return images, labels, FASHION_MNIST_CLASSES


def load_digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's bundled digits: 1797 images of 8x8 with intensities 0..16."""
    from sklearn.datasets import load_digits as sklearn_load_digits

    digits = sklearn_load_digits()
    # 16 -> 255 exactly; the bundled values are integers in 0..16.
    images = np.rint(digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64), DIGITS_CLASSES


def balanced_subset(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of up to ``per_class`` randomly chosen images of every class, sorted."""
    rng = np.random.RandomState(seed)
    picks = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picks.append(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
    return np.sort(np.concatenate(picks))


def class_folder_names(class_names: list[str]) -> list[str]:
    """Folder names that sort in label order (a leading index, zero-padded past ten classes)."""
    width = len(str(len(class_names) - 1))
    return [f"{i:0{width}d}-{name}" for i, name in enumerate(class_names)]


def write_image_tree(dest: str, images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> list[str]:
    """Write ``dest/<class folder>/<index>.png`` for every image; return the folder names.

    Written into a temporary sibling folder that replaces ``dest`` when complete, so an
    interrupted run never leaves a half-written tree under ``dest``.
    """
    folders = class_folder_names(class_names)
    with dnnlib.util.atomic_path(dest.rstrip("/\\")) as tmp:
        for folder in folders:
            os.makedirs(os.path.join(tmp, folder))
        for i, (image, label) in enumerate(zip(images, labels)):
            PIL.Image.fromarray(image, "L").save(os.path.join(tmp, folders[label], f"{i:05d}.png"))
        shutil.rmtree(dest, ignore_errors=True)  # the rename replaces only an empty folder
    return folders


def make_demo_images(
    dest: str, data: str = "auto", per_class: int = 600, seed: int = 0, fashion_root: str = FASHION_MNIST_DIR
) -> dict:
    """Write the demo's labelled image tree; return what was used (``data``, ``classes``,
    ``num_images``, ``resolution``)."""
    if data == "auto":  # Fashion-MNIST where it is installed, else the digits
        data = "fashion-mnist" if fashion_mnist_available(fashion_root) else "digits"
    if data == "fashion-mnist":
        if not fashion_mnist_available(fashion_root):
            raise FileNotFoundError(
                f"Fashion-MNIST is not installed in {fashion_root} (apt-get install dataset-fashion-mnist)"
            )
        images, labels, names = load_fashion_mnist(fashion_root)
    elif data == "digits":
        images, labels, names = load_digits()
    else:
        raise ValueError(f"unknown data {data!r}; choose from {', '.join(DATA_CHOICES)}")
    keep = balanced_subset(labels, per_class, seed=seed)
    folders = write_image_tree(dest, images[keep], labels[keep], names)
    return dict(data=data, classes=folders, num_images=len(keep), resolution=images.shape[1])


@click.command()
@click.option("--dest", help="Folder to write (replaced if it exists)", metavar="DIR", type=str, required=True)
@click.option("--data", help="Which images", type=click.Choice(DATA_CHOICES), default="auto", show_default=True)
@click.option(
    "--per-class", help="Images per class", metavar="INT", type=click.IntRange(min=1), default=600, show_default=True
)
@click.option("--seed", help="Seed of the subset", metavar="INT", type=int, default=0, show_default=True)
@click.option(
    "--fashion-root",
    help="Where the Fashion-MNIST IDX files are",
    metavar="DIR",
    type=str,
    default=FASHION_MNIST_DIR,
    show_default=True,
)
def main(dest: str, data: str, per_class: int, seed: int, fashion_root: str) -> None:
    """Write a labelled folder of PNGs (one folder per class) for the demo."""
    try:
        dnnlib.util.check_output_dir(dest, "--dest")
        info = make_demo_images(dest, data=data, per_class=per_class, seed=seed, fashion_root=fashion_root)
    except ImportError as err:
        raise click.ClickException(f"The digits need scikit-learn: {err}") from None
    except (OSError, ValueError) as err:
        raise click.ClickException(dnnlib.util.one_line(err)) from None
    if info["data"] == "fashion-mnist":
        print(f"Data: Fashion-MNIST (from {fashion_root})")
    else:
        print("Data: scikit-learn digits" + (" (fallback: Fashion-MNIST is not installed)" if data == "auto" else ""))
    print(
        f"Wrote {info['num_images']} images of {info['resolution']}x{info['resolution']} in "
        f"{len(info['classes'])} classes ({', '.join(info['classes'])}) to {dest}"
    )


if __name__ == "__main__":
    main()
