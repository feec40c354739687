"""Put the sample grids of a training run side by side: how the samples evolve over training.

``train_edm2.py`` writes ``samples-{kimg:07d}.png`` at every network snapshot (the same seeds and
classes each time); this tiles them left to right in kimg order, each under a "<kimg> kimg" label,
enlarged by an integer factor (nearest neighbour, so no detail is invented).

    python scripts/demo_progress.py --run demo-output/run --out demo-output/progress.png

Layout (what ``progress_size`` computes): grids of ``width*scale x height*scale`` pixels with a
``gap``-pixel white margin around and between them and a ``label_height``-pixel label row on top.
"""

import os
import re
import sys

import click
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dnnlib  # noqa: E402  (the repository root is on the path only from here on)

SAMPLES_RE = re.compile(r"samples-(\d{7})\.png")


def find_grids(run_dir: str) -> list[tuple[int, str]]:
    """(kimg, path) of every samples-*.png of a run directory, in kimg order."""
    matches = [SAMPLES_RE.fullmatch(name) for name in os.listdir(run_dir)]
    return sorted((int(m.group(1)), os.path.join(run_dir, m.group(0))) for m in matches if m)


def progress_size(
    num_grids: int, width: int, height: int, scale: int = 2, gap: int = 8, label_height: int = 16
) -> tuple[int, int]:
    """(width, height) of the progress image."""
    return num_grids * (width * scale + gap) + gap, label_height + height * scale + 2 * gap


def make_progress(run_dir: str, out: str, scale: int = 2, gap: int = 8, label_height: int = 16) -> tuple[int, int]:
    """Tile the run's grids into ``out`` (PNG, written atomically); returns its (width, height)."""
    grids = find_grids(run_dir)
    if not grids:
        raise FileNotFoundError(f"{run_dir} has no samples-*.png (train with --grid > 0)")
    images = [PIL.Image.open(path).convert("RGB") for _, path in grids]
    width, height = images[0].size
    canvas = PIL.Image.new("RGB", progress_size(len(images), width, height, scale, gap, label_height), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(canvas)
    font = PIL.ImageFont.load_default()
    for idx, ((kimg, _), image) in enumerate(zip(grids, images)):
        x = gap + idx * (width * scale + gap)
        draw.text((x, gap // 2), f"{kimg} kimg", fill=(0, 0, 0), font=font)
        canvas.paste(image.resize((width * scale, height * scale), PIL.Image.NEAREST), (x, gap + label_height))
    with dnnlib.util.atomic_path(out) as tmp:
        canvas.save(tmp, format="PNG")
    return canvas.size


@click.command()
@click.option("--run", "run_dir", help="Training run directory", metavar="DIR", type=str, required=True)
@click.option("--out", help="Progress PNG to write", metavar="PNG", type=str, required=True)
@click.option(
    "--scale",
    help="Enlargement factor of each grid",
    metavar="INT",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
)
def main(run_dir: str, out: str, scale: int) -> None:
    """Tile the sample grids of a run (samples-*.png) side by side with their kimg."""
    try:
        size = make_progress(run_dir, out, scale=scale)
    except OSError as err:
        raise click.ClickException(" ".join(str(err).split())) from None
    print(f"Wrote a {size[0]}x{size[1]} picture of {len(find_grids(run_dir))} grids to {out}")


if __name__ == "__main__":
    main()
