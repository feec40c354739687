"""Sample a class-conditional grid from a trained network: one row per class, one column per seed.

Every row uses the same seeds, so a column shares its initial noise and differs only in the class
label. The images come from ``generate_images.generate_images`` (the library function behind
``generate_images.py``), are enlarged by an integer factor (nearest neighbour, so no detail is
invented) and tiled with the class names on the left.

    python scripts/demo_grid.py --net demo-output/phema/phema-0000065-0.100.pkl \\
        --classes demo-output/images --out demo-output/grid.png

Layout (what ``grid_size`` computes): a ``pad``-pixel gap around and between cells of
``resolution * scale`` pixels, after a ``label_width``-pixel column of class names.
"""

import os
import sys
from collections.abc import Sequence
from typing import Any, Optional

import click
import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dnnlib  # noqa: E402  (the repository root is on the path only from here on)
import generate_images  # noqa: E402
from torch_utils import persistence  # noqa: E402


def grid_size(
    num_rows: int, num_cols: int, resolution: int, scale: int = 4, pad: int = 2, label_width: int = 100
) -> tuple[int, int]:
    """(width, height) of the grid image."""
    cell = resolution * scale
    return label_width + num_cols * (cell + pad) + pad, num_rows * (cell + pad) + pad


def class_names_from(spec: str) -> list[str]:
    """Class names from a folder (its sorted subfolder names, as ``dataset_tool.py convert``
    assigns labels) or from a comma-separated list."""
    if os.path.isdir(spec):
        names = sorted(entry.name for entry in os.scandir(spec) if entry.is_dir())
        if not names:
            raise ValueError(f"{spec} has no subfolders to take class names from")
        return names
    return [name.strip() for name in spec.split(",")]


def sample_rows(
    net: torch.nn.Module,
    num_classes: int,
    seeds: Sequence[int],
    encoder: Optional[Any] = None,
    device: Optional[torch.device] = None,
    **sampler_kwargs: Any,
) -> list[np.ndarray]:
    """One NHWC uint8 array per class: the images of ``seeds`` with that class label."""
    kwargs = dict(encoder=encoder, seeds=seeds, device=device, verbose=False, **sampler_kwargs)
    rows = []
    for c in range(num_classes):
        images = [r.images for r in generate_images.generate_images(net, class_idx=c, **kwargs)]
        rows.append(torch.cat(images).permute(0, 2, 3, 1).cpu().numpy())
    return rows


def tile_grid(
    rows: Sequence[np.ndarray], class_names: Sequence[str], scale: int = 4, pad: int = 2, label_width: int = 100
) -> PIL.Image.Image:
    """Tile equally shaped NHWC uint8 rows into one RGB image with the class names on the left."""
    num_cols, res = rows[0].shape[0], rows[0].shape[1]
    cell = res * scale
    grid = PIL.Image.new("RGB", grid_size(len(rows), num_cols, res, scale, pad, label_width), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(grid)
    font = PIL.ImageFont.load_default()
    for r, (row, name) in enumerate(zip(rows, class_names)):
        y = pad + r * (cell + pad)
        left, top, right, bottom = draw.textbbox((0, 0), name, font=font)
        draw.text((4, y + (cell - (bottom - top)) // 2 - top), name, fill=(0, 0, 0), font=font)
        for c, image in enumerate(row):
            tile = PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).convert("RGB")
            tile = tile.resize((cell, cell), PIL.Image.NEAREST)
            grid.paste(tile, (label_width + pad + c * (cell + pad), y))
    return grid


def make_grid(
    net_path: str,
    out: str,
    class_names: Optional[Sequence[str]] = None,
    num_cols: int = 8,
    seed: int = 0,
    scale: int = 4,
    pad: int = 2,
    label_width: int = 100,
    device: Optional[torch.device] = None,
    **sampler_kwargs: Any,
) -> tuple[int, int]:
    """Load a network pickle, sample one row per class and write the grid PNG atomically.
    Returns the grid's (width, height)."""
    data = persistence.load_network_pickle(net_path, verbose=False)
    net = data["ema"]
    if net.label_dim == 0:
        raise ValueError(f"{net_path} holds an unconditional network; the grid needs classes")
    if class_names is None:
        class_names = [str(c) for c in range(net.label_dim)]
    if len(class_names) != net.label_dim:
        raise ValueError(f"{len(class_names)} class names given, but the network has {net.label_dim} classes")
    rows = sample_rows(
        net, net.label_dim, range(seed, seed + num_cols), encoder=data.get("encoder"), device=device, **sampler_kwargs
    )
    grid = tile_grid(rows, class_names, scale=scale, pad=pad, label_width=label_width)
    with dnnlib.util.atomic_path(out) as tmp:
        grid.save(tmp, format="PNG")
    return grid.size


def _int_option(name: str, text: str, default: int, minimum: int = 1) -> Any:
    return click.option(
        name, help=text, metavar="INT", type=click.IntRange(min=minimum), default=default, show_default=True
    )


@click.command()
@click.option("--net", help="Network pickle", metavar="PATH", type=str, required=True)
@click.option("--out", help="Grid PNG to write", metavar="PNG", type=str, required=True)
@click.option(
    "--classes",
    help="Class names: a folder of class folders, or a comma-separated list  [default: 0, 1, ...]",
    metavar="DIR|LIST",
    type=str,
    default=None,
)
@_int_option("--cols", "Images per class", 8)
@_int_option("--seed", "First seed (every row uses the same seeds)", 0, minimum=0)
@_int_option("--scale", "Enlargement factor of each image", 4)
@_int_option("--steps", "Number of sampling steps", 32)
def main(net: str, out: str, classes: Optional[str], cols: int, seed: int, scale: int, steps: int) -> None:
    """Sample a class-conditional grid (one row per class) into a PNG."""
    try:
        dnnlib.util.check_output_file(out, "--out", what="grid")
        dnnlib.util.check_input_file(net, "--net", what="network pickle")
        names = class_names_from(classes) if classes is not None else None
        size = make_grid(net, out, class_names=names, num_cols=cols, seed=seed, scale=scale, num_steps=steps)
    except (OSError, ValueError) as err:
        raise click.ClickException(dnnlib.util.one_line(err)) from None
    print(f"Wrote a {size[0]}x{size[1]} grid to {out}")


if __name__ == "__main__":
    main()
