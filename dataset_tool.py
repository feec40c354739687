"""Create datasets for training and evaluation.

    convert  images (folder tree or ZIP) -> uncompressed PNGs, optionally cropped and resized
    encode   PNG dataset -> VAE latents (posterior mean and std, 2x the VAE's latent channels, float32
             .npy) of any diffusers AutoencoderKL, and their per-channel statistics
    decode   latent dataset -> PNG images (the mean by default, or a posterior draw with --sample)

Every output is a ZIP archive (ZIP_STORED) or an empty folder holding `00000/img00000000.png` style
files and a `dataset.json` with the labels (`null` unless every image has one); `encode` adds a
"vae" entry: the VAE's name, its latent channel count, and the mean and standard deviation of the raw
latents per channel (`LatentStatistics`), from which training builds its encoder. Outputs are written
under a temporary name beside the destination and renamed when complete, so a failure never leaves a
half-written dataset behind. The functions raise plain exceptions (ValueError for bad arguments, OSError
for bad files); only the click commands at the end turn them into one-line errors.
"""

import contextlib
import functools
import io
import json
import os
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Optional

import click
import numpy as np
import PIL.Image
from tqdm import tqdm

import dnnlib
from torch_utils import distributed, misc
from training import cli
from training.dataset import check_labelled_files_exist, file_ext, image_extensions, list_folder

# ----------------------------------------------------------------------------
# Reading a source: a folder tree or a ZIP archive.


@dataclass
class SourceFile:
    name: str  # path relative to the source root, '/' separated
    label: Any  # label from dataset.json or the top-level folder name; None = unlabelled


class Source:
    """The image (or .npy) files of a folder tree or a ZIP archive, sorted by name, with their labels.

    A folder is searched recursively, following symbolic links. Labels come from a `dataset.json` in
    the root (it must not label files the source lacks); failing that, for a folder, from the names of
    the top-level folders (sorted, numbered from 0) when there are at least two of them.
    """

    def __init__(self, path: str, exts: set, max_files: Optional[int] = None):
        self.path = path
        self._zip: Optional[zipfile.ZipFile] = None
        if os.path.isdir(path):
            names = list_folder(path)
        elif not os.path.exists(path):
            raise FileNotFoundError(f"Source does not exist: {path}")
        elif file_ext(path) != ".zip":
            raise ValueError(f"Source must be a folder or a .zip archive: {path}")
        else:
            try:
                self._zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as err:
                raise OSError(f"Source is not a readable ZIP archive: {path} ({err})") from None
            names = self._zip.namelist()

        files = sorted(n for n in names if file_ext(n) in exts)
        if len(files) == 0:
            kinds = "/".join(sorted(exts)) if len(exts) <= 3 else "image"
            raise OSError(f"No {kinds} files found in {path}")
        labels = self._read_labels(names)
        check_labelled_files_exist(labels, set(files), path)
        if len(labels) == 0 and self._zip is None:
            labels = self._folder_labels(files)
        self.files = [SourceFile(name=n, label=labels.get(n)) for n in files[:max_files]]

    def _read_labels(self, names: list) -> dict:
        self.json: dict = {}  # The whole dataset.json (labels and e.g. the "vae" entry of encode).
        if "dataset.json" not in names:
            return {}
        try:
            with self.open("dataset.json") as f:
                self.json = json.load(f)
            labels = self.json.get("labels")
            return {} if labels is None else {name: label for name, label in labels}
        except (ValueError, TypeError, AttributeError, OSError) as err:
            raise ValueError(f"Cannot parse dataset.json in {self.path}: {err}") from None

    @staticmethod
    def _folder_labels(names: list) -> dict:
        # Files directly in the root count as one more class, named '' (the reference does the same).
        toplevel = {name: name.split("/")[0] if "/" in name else "" for name in names}
        classes = {cls: idx for idx, cls in enumerate(sorted(set(toplevel.values())))}
        if len(classes) < 2:
            return {}
        return {name: classes[cls] for name, cls in toplevel.items()}

    def open(self, name: str) -> BinaryIO:
        if self._zip is not None:
            return self._zip.open(name, "r")
        return open(os.path.join(self.path, name), "rb")

    def _read(self, file: SourceFile, load: Callable[[BinaryIO], np.ndarray], what: str) -> np.ndarray:
        try:
            with self.open(file.name) as f:
                return load(f)
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise OSError(f"Cannot read {what} {file.name}: {err}") from None

    def read_image(self, file: SourceFile) -> np.ndarray:
        """Pixels of an image file as HWC uint8 RGB."""
        return self._read(file, lambda f: np.array(PIL.Image.open(f).convert("RGB")), "image")

    def read_npy(self, file: SourceFile) -> np.ndarray:
        return self._read(file, np.load, "array")

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


# ----------------------------------------------------------------------------
# Writing a destination: a ZIP archive or an empty folder, under a temporary name until complete.


class DatasetWriter:
    """Writes `name -> bytes` into `dest` (a ZIP_STORED archive if it ends in .zip, else a folder).

    Creating one checks `dest`. Used as a context manager, it writes into a temporary file or folder
    beside `dest` (`dnnlib.util.atomic_path`), renamed to `dest` when the block succeeds and removed
    when it fails.
    """

    def __init__(self, dest: str):
        self.dest = dest
        self.is_zip = file_ext(dest) == ".zip"
        if dest == "":
            raise ValueError("--dest must not be an empty string")
        if self.is_zip and os.path.isdir(dest):
            raise ValueError(f"--dest is a folder, not a ZIP file: {dest}")
        if not self.is_zip and os.path.exists(dest):
            if not os.path.isdir(dest):
                raise ValueError(f"--dest exists and is not a folder (name a .zip to write an archive): {dest}")
            if len(os.listdir(dest)) != 0:
                raise ValueError(f"--dest folder must be empty: {dest}")
        self._zip: Optional[zipfile.ZipFile] = None
        self._folder: Optional[str] = None
        self._exit_stack = contextlib.ExitStack()

    def __enter__(self) -> "DatasetWriter":
        with contextlib.ExitStack() as stack:
            temp = stack.enter_context(dnnlib.util.atomic_path(self.dest))
            if self.is_zip:
                self._zip = stack.enter_context(zipfile.ZipFile(temp, mode="w", compression=zipfile.ZIP_STORED))
            else:
                os.mkdir(temp)
                self._folder = temp
            self._exit_stack = stack.pop_all()  # closed (zip first, then the rename) by __exit__
        return self

    def __exit__(self, *exc_info: Any) -> bool:
        return self._exit_stack.__exit__(*exc_info)

    def write(self, name: str, data: Any) -> None:
        if isinstance(data, str):
            data = data.encode("utf8")
        if self._zip is not None:
            self._zip.writestr(name, bytes(data))
            return
        path = os.path.join(self._folder, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def image_name(idx: int) -> str:
    """Archive name of output image idx: 00000/img00000000.png (the folder is the first five digits)."""
    s = f"{idx:08d}"
    return f"{s[:5]}/img{s}.png"


def latent_name(idx: int) -> str:
    """Archive name of encoded image idx: 00000/img-mean-std-00000000.npy."""
    s = f"{idx:08d}"
    return f"{s[:5]}/img-mean-std-{s}.npy"


def png_bytes(img: np.ndarray) -> bytes:
    """HWC uint8 RGB -> uncompressed PNG."""
    buf = io.BytesIO()
    PIL.Image.fromarray(img).save(buf, format="png", compress_level=0, optimize=False)
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def labels_json(labels: list, **extra: Any) -> str:
    """dataset.json: the [name, label] pairs, or null unless every written file has a label; then `extra`."""
    return json.dumps({"labels": labels if all(x is not None for x in labels) else None, **extra})


# ----------------------------------------------------------------------------
# Transforms: HWC uint8 RGB in, HWC uint8 RGB out (None = skip this image).


def parse_resolution(s: Optional[str]) -> Optional[tuple]:
    """'512x512' or '512,512' -> (512, 512)."""
    if s is None:
        return None
    try:
        w, h = (int(p) for p in s.lower().replace(",", "x").split("x"))
    except ValueError:
        raise ValueError(f"expected WxH or W,H with positive integers, got {s!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"width and height must be positive, got {s!r}")
    return w, h


def _resize(img: np.ndarray, width: int, height: int, resample: int = PIL.Image.Resampling.LANCZOS) -> np.ndarray:
    if img.shape[1] == width and img.shape[0] == height:
        return img  # what Pillow's resize to the same size returns, too
    return np.array(PIL.Image.fromarray(img).resize((width, height), resample))


def scale(width: Optional[int], height: Optional[int], img: np.ndarray) -> np.ndarray:
    """No transform: resize the whole image to the resolution, if one is given (Lanczos)."""
    return _resize(img, width or img.shape[1], height or img.shape[0])


def center_crop(width: int, height: int, img: np.ndarray) -> np.ndarray:
    """The largest centred square, resized to width x height (Lanczos)."""
    h, w = img.shape[:2]
    s = min(h, w)
    return _resize(img[(h - s) // 2 : (h + s) // 2, (w - s) // 2 : (w + s) // 2], width, height)


def _letterbox(img: np.ndarray) -> np.ndarray:
    """A width x height image in the middle rows of a black width x width square."""
    height, width = img.shape[:2]
    canvas = np.zeros([width, width, 3], dtype=np.uint8)
    canvas[(width - height) // 2 : (width + height) // 2] = img
    return canvas


def center_crop_wide(width: int, height: int, img: np.ndarray) -> Optional[np.ndarray]:
    """The reference's center-crop-wide, pixel for pixel: ch = round(width·h/w), the image height at the
    output width; skip the image (None) if it is narrower than the output or ch < height; else take the
    centred ch input rows at full width, resize them to width x height (Lanczos) and letterbox that
    into a black width x width square.

    ch counts rows of the image scaled to the output width, but is cut from the input as it is, so the
    band's aspect w:ch = w²:(width·h) matches the output's only when (w/width)² = h/height; otherwise
    the resize stretches it. `center_crop_wide_aspect` crops the output aspect instead.
    """
    h, w = img.shape[:2]
    ch = int(np.round(width * h / w))
    if w < width or ch < height:
        return None
    return _letterbox(_resize(img[(h - ch) // 2 : (h + ch) // 2], width, height))


def center_crop_wide_aspect(width: int, height: int, img: np.ndarray) -> Optional[np.ndarray]:
    """center-crop-wide with the geometry its name promises: the centred band of the output aspect at
    full input width (round(w·height/width) input rows, at most h), resized to width x height (Lanczos)
    and letterboxed into a black width x width square. It skips the same images as `center_crop_wide`."""
    h, w = img.shape[:2]
    if w < width or round(width * h / w) < height:
        return None
    band = min(h, round(w * height / width))
    return _letterbox(_resize(img[(h - band) // 2 : (h + band) // 2], width, height))


def center_crop_dhariwal(size: int, img: np.ndarray) -> np.ndarray:
    """ADM's ImageNet recipe: halve with a box filter while the short side is >= 2·size, then bicubic so
    that the short side equals size, then take the centred size x size crop."""
    pil = PIL.Image.fromarray(img)
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=PIL.Image.Resampling.BOX)
    s = size / min(pil.size)
    pil = pil.resize(tuple(round(x * s) for x in pil.size), resample=PIL.Image.Resampling.BICUBIC)
    arr = np.array(pil)
    y = (arr.shape[0] - size) // 2
    x = (arr.shape[1] - size) // 2
    return arr[y : y + size, x : x + size]


TRANSFORMS = ["center-crop", "center-crop-wide", "center-crop-wide-aspect", "center-crop-dhariwal"]


def check_output_size(width: int, height: int) -> None:
    """Training needs square images with a power-of-two side."""
    if width != height:
        raise ValueError(f"Images must be square after scale and crop, got {width}x{height}")
    if width < 1 or width & (width - 1) != 0:
        raise ValueError(f"Image width/height must be a power of two after scale and crop, got {width}")


def make_transform(
    transform: Optional[str], resolution: Optional[tuple]
) -> Callable[[np.ndarray], Optional[np.ndarray]]:
    """The per-image crop/resize function; checks the options first (before anything is read)."""
    if transform is None:
        if resolution is not None:
            check_output_size(*resolution)
        return functools.partial(scale, *(resolution or (None, None)))
    if transform not in TRANSFORMS:
        raise ValueError(f"--transform: unknown transform {transform!r}; expected one of {', '.join(TRANSFORMS)}")
    if resolution is None:
        raise ValueError(f"--transform={transform} needs --resolution=WxH")
    width, height = resolution
    if transform in ("center-crop-wide", "center-crop-wide-aspect"):
        if height > width:
            raise ValueError(
                f"{transform} letterboxes into a {width}x{width} square, so the height must not exceed the width, got {width}x{height}"
            )
        check_output_size(width, width)
        crop = center_crop_wide if transform == "center-crop-wide" else center_crop_wide_aspect
        return functools.partial(crop, width, height)
    check_output_size(width, height)
    if transform == "center-crop":
        return functools.partial(center_crop, width, height)
    return functools.partial(center_crop_dhariwal, width)


# ----------------------------------------------------------------------------
# The three operations, as plain functions.


def _check_same_size(name: str, size: tuple, first: Optional[tuple], hint: str = "") -> tuple:
    """size: (height, width) of input `name`; first: that of the first input (None for the first)."""
    if first is not None and size != first:
        raise ValueError(
            f"Input {name} is {size[1]}x{size[0]}, but earlier ones are {first[1]}x{first[0]}; "
            f"all must have the same size{hint}"
        )
    return size


def convert_dataset(
    source: str,
    dest: str,
    max_images: Optional[int] = None,
    transform: Optional[str] = None,
    resolution: Optional[tuple] = None,
) -> int:
    """Convert a folder tree or ZIP of images into a dataset of uncompressed PNGs. Returns the image count."""
    out = DatasetWriter(dest)  # checks dest
    transform_image = make_transform(transform, resolution)
    src = Source(source, image_extensions(), max_images)
    with contextlib.closing(src), out:
        labels, first = [], None
        for idx, file in enumerate(tqdm(src.files, desc="convert", unit="img")):
            img = transform_image(src.read_image(file))
            if img is None:
                continue  # too small for center-crop-wide; its number stays unused
            if first is None:
                check_output_size(img.shape[1], img.shape[0])
            first = _check_same_size(file.name, img.shape[:2], first, " (--resolution resizes images)")
            out.write(image_name(idx), png_bytes(img))
            labels.append([image_name(idx), file.label] if file.label is not None else None)
        if first is None:
            raise ValueError(
                f"No image of {source} was large enough for {transform} at {resolution[0]}x{resolution[1]}"
            )
        out.write("dataset.json", labels_json(labels))
    return len(labels)


DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"


class LatentStatistics:
    """Per-channel mean and standard deviation of the raw latents, over the posterior's draws.

    The encoder's final latents are draws z = mean + std·noise from each image's posterior, so the
    statistics that make them zero-mean with a chosen standard deviation are those of z over the
    data set and the noise: E[z] = E[mean] and Var[z] = E[mean² + std²] - E[mean]², summed here in
    float64, exactly (no draws needed).
    """

    def __init__(self):
        self.count = 0
        self.sum = self.sum_sq = None

    def add(self, mean_std: np.ndarray) -> None:
        """mean_std: [N, 2C, H, W] raw latents (posterior mean, then std)."""
        mean, std = np.split(mean_std.astype(np.float64), 2, axis=1)
        self.count += mean.shape[0] * mean.shape[2] * mean.shape[3]
        s, ss = mean.sum(axis=(0, 2, 3)), (mean**2 + std**2).sum(axis=(0, 2, 3))
        self.sum, self.sum_sq = (s, ss) if self.sum is None else (self.sum + s, self.sum_sq + ss)

    def result(self) -> tuple:
        """(raw_mean, raw_std) as lists of floats."""
        mean = self.sum / self.count
        std = np.sqrt(np.maximum(self.sum_sq / self.count - mean**2, 0))
        return [float(x) for x in mean], [float(x) for x in std]


def vae_identity(name: str) -> str:
    """How a VAE is named in dataset.json and compared: a local folder by its absolute path (so that a
    dataset can be used from anywhere), anything else (a Hugging Face name) as it is."""
    return os.path.abspath(name) if os.path.isdir(name) else name


def _vae_pass(op: str, src: Source, out: DatasetWriter, encoder_kwargs: dict, batch, device, load_item, run_vae):
    """The loop shared by encode and decode (`op`): read `batch` inputs at a time (`load_item` gives a CHW
    array per file), run them through the VAE, and write one output per input (same index, same label),
    atomically. Returns the label list; the caller writes dataset.json before the writer closes."""
    import torch

    from training.encoders import StabilityVAEEncoder

    out_name, to_bytes = (latent_name, npy_bytes) if op == "encode" else (image_name, png_bytes)
    device = torch.device(device) if device is not None else misc.default_device()
    vae = StabilityVAEEncoder(**encoder_kwargs, batch_size=batch)
    try:
        vae.init(device)  # the slow part: after every check
    except (OSError, ValueError) as err:
        raise OSError(f"Cannot load the VAE {vae.vae_name}: {str(err).splitlines()[0]}") from None
    with tqdm(total=len(src.files), desc=op, unit="img") as bar:
        labels, first = [], None
        for i in range(0, len(src.files), batch):
            chunk = list(enumerate(src.files[i : i + batch], start=i))
            arrays = [load_item(src, file) for _idx, file in chunk]
            for (_idx, file), array in zip(chunk, arrays):
                first = _check_same_size(file.name, array.shape[1:], first)
            with torch.no_grad():
                results = run_vae(vae, torch.as_tensor(np.stack(arrays)).to(device), chunk)
            for (idx, file), result in zip(chunk, results):
                out.write(out_name(idx), to_bytes(result))
                labels.append([out_name(idx), file.label] if file.label is not None else None)
            bar.update(len(chunk))
    return labels


def _open_source_and_dest(source: str, dest: str, extensions: set, max_images, batch: int) -> tuple:
    if batch < 1:
        raise ValueError(f"--batch must be at least 1, got {batch}")
    out = DatasetWriter(dest)  # checks dest
    return Source(source, extensions, max_images), out


def encode_dataset(
    source: str,
    dest: str,
    model_url: str = DEFAULT_VAE,
    max_images: Optional[int] = None,
    batch: int = 8,
    device: Optional[str] = None,
    stats_images: Optional[int] = None,
) -> int:
    """Encode a dataset of images into VAE latents: float32 [2C, H/f, W/f] arrays (mean, then std), and
    store in dataset.json the VAE (`model_url`, a Hugging Face name or a local AutoencoderKL folder), its
    latent channel count C and the latents' per-channel statistics (`LatentStatistics`) over all images
    or over `stats_images` of them (a fixed random subset)."""
    if stats_images is not None and stats_images < 1:
        raise ValueError(f"--stats-images must be at least 1, got {stats_images}")
    src, out = _open_source_and_dest(source, dest, image_extensions(), max_images, batch)
    num = len(src.files)
    chosen = np.ones(num, dtype=bool)
    if stats_images is not None and stats_images < num:
        chosen[:] = False
        chosen[np.random.RandomState(0).choice(num, stats_images, replace=False)] = True
    stats = LatentStatistics()

    def load_item(src, file):
        return src.read_image(file).transpose(2, 0, 1)  # HWC -> CHW uint8

    def run_vae(vae, x, chunk):
        import torch

        result = vae.encode_pixels(x).to(torch.float32).cpu().numpy()
        stats.add(result[chosen[[idx for idx, _ in chunk]]])
        return result

    with contextlib.closing(src), out:
        labels = _vae_pass(
            "encode", src, out, dict(vae_name=vae_identity(model_url)), batch, device, load_item, run_vae
        )
        raw_mean, raw_std = stats.result()
        vae = dict(
            name=vae_identity(model_url),
            latent_channels=len(raw_mean),
            raw_mean=raw_mean,
            raw_std=raw_std,
            stats_images=int(chosen.sum()),
        )
        out.write("dataset.json", labels_json(labels, vae=vae))
    return len(labels)


def final_latents(vae: Any, mean_std: Any, sample: bool = False, noise: Any = None) -> Any:
    """Raw latents (mean and std, 2C channels) -> the final latents that `vae.decode` takes.

    The mean itself by default; with sample=True the posterior draw mean + noise·std (noise ~ N(0, I)).
    Then the per-channel normalisation of `encode_latents`: final = raw·scale + bias.
    """
    mean, std = mean_std.chunk(2, dim=1)
    raw = mean + noise * std if sample else mean
    scale = raw.new_tensor(vae.scale).reshape(1, -1, 1, 1)
    bias = raw.new_tensor(vae.bias).reshape(1, -1, 1, 1)
    return raw * scale + bias


def decoder_kwargs(stored: Optional[dict], model_url: Optional[str]) -> dict:
    """The StabilityVAEEncoder arguments for decoding a dataset whose dataset.json has the "vae" entry
    `stored` (None for datasets without one): its VAE and statistics. A `model_url` other than the
    stored VAE is refused; without a stored VAE it is used as given (default: the Stable Diffusion one)."""
    if stored is None:
        return dict(vae_name=model_url or DEFAULT_VAE)
    try:
        name, raw_mean, raw_std = stored["name"], list(stored["raw_mean"]), list(stored["raw_std"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"Malformed 'vae' entry in dataset.json: {dnnlib.util.one_line(err)}") from None
    if model_url is not None and vae_identity(model_url) != name:
        raise ValueError(f"--vae {model_url} differs from the VAE the dataset was encoded with ({name})")
    return dict(vae_name=name, raw_mean=raw_mean, raw_std=raw_std)


def decode_dataset(
    source: str,
    dest: str,
    model_url: Optional[str] = None,
    max_images: Optional[int] = None,
    sample: bool = False,
    seed: int = 0,
    batch: int = 8,
    device: Optional[str] = None,
) -> int:
    """Decode a dataset written by `encode` back into PNG images, with the VAE it was encoded with
    (`model_url` None) or, for datasets that do not name one, `model_url` (default: Stable Diffusion's)."""
    import torch

    src, out = _open_source_and_dest(source, dest, {".npy"}, max_images, batch)
    try:
        kwargs = decoder_kwargs(src.json.get("vae"), model_url)
    except ValueError:
        src.close()
        raise
    channels = 2 * len(kwargs.get("raw_mean", [0] * 4))

    def load_item(src, file):
        array = src.read_npy(file)
        if array.ndim != 3 or array.shape[0] != channels:
            raise ValueError(
                f"{file.name} has shape {list(array.shape)}; expected VAE mean and std [{channels}, H, W] as written by encode"
            )
        return array.astype(np.float32)

    def run_vae(vae, x, chunk):
        noise = None
        if sample:  # one generator per image: a draw does not depend on the batch it lands in
            shape = [channels // 2, *x.shape[2:]]
            noise = [np.random.default_rng([seed, idx]).standard_normal(shape, dtype=np.float32) for idx, _ in chunk]
            noise = torch.as_tensor(np.stack(noise)).to(x.device)
        return vae.decode(final_latents(vae, x, sample=sample, noise=noise)).permute(0, 2, 3, 1).cpu().numpy()

    with contextlib.closing(src), out:
        labels = _vae_pass("decode", src, out, kwargs, batch, device, load_item, run_vae)
        out.write("dataset.json", labels_json(labels))
    return len(labels)


# ----------------------------------------------------------------------------
# Command line.


# fmt: off
@click.group()
# fmt: on
def cmdline() -> None:
    """Create datasets: convert images to PNG datasets, encode them to VAE latents, decode latents back.

    \b
    python dataset_tool.py convert --source=downloads/imagenet/train --dest=datasets/img512.zip \\
        --resolution=512x512 --transform=center-crop-dhariwal
    python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip
    python dataset_tool.py decode --source=datasets/img512-sd.zip --dest=decoded/
    """
    with cli.one_line_errors():
        distributed.refuse_torchrun("dataset_tool.py")


def _resolution_option(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[tuple]:
    try:
        return parse_resolution(value)
    except ValueError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None


# fmt: off
_dest_option = click.option("--dest", help="Output folder or ZIP archive", metavar="PATH", type=str, required=True)
_vae_option = click.option("--vae", "--model-url", "model_url", help="VAE: Hugging Face name or local folder of a diffusers AutoencoderKL (--model-url: the same)", metavar="NAME|DIR", type=str, default=DEFAULT_VAE, show_default=True)
_decode_vae_option = click.option("--vae", "--model-url", "model_url", help="VAE: must be the one the dataset was encoded with  [default: the dataset's, else " + DEFAULT_VAE + "]", metavar="NAME|DIR", type=str)
_batch_option = click.option("--batch", help="Images per VAE call", metavar="INT", type=click.IntRange(min=1), default=8, show_default=True)
# fmt: on


# fmt: off
@cmdline.command()
@click.option("--source", help="Input folder or ZIP archive", metavar="PATH", type=str, required=True)
@_dest_option
@click.option("--max-images", help="Maximum number of input images", metavar="INT", type=click.IntRange(min=1))
@click.option("--transform", help="Input crop/resize mode (see above)", type=click.Choice(TRANSFORMS))
@click.option("--resolution", help="Output resolution (e.g. 512x512)", metavar="WxH", callback=_resolution_option)
# fmt: on
def convert(
    source: str, dest: str, max_images: Optional[int], transform: Optional[str], resolution: Optional[tuple]
) -> None:
    """Convert an image folder tree or ZIP archive into a dataset (PNG, ZIP or folder).

    \b
    The input is a folder (searched recursively, following symbolic links) or a ZIP. Labels come
    from its dataset.json (which must not label files that are not there), else from the names of
    its top-level folders when there are at least two.
    The output images must be square with a power-of-two side, and all equal.

    \b
    Transforms (the crop/resize applied to each input image):
      (none)                   resize the whole image to --resolution, if given (Lanczos)
      center-crop              the largest centred square, resized (Lanczos)
      center-crop-wide         the reference's wide crop, pixel for pixel: the centred round(W*h/w)
                               input rows (WxH = output, wxh = input), resized to WxH and
                               letterboxed into a black WxW square; skips images narrower than W or
                               with round(W*h/w) < H, leaving gaps in the numbering. The band is
                               stretched unless (w/W)^2 = h/H
      center-crop-wide-aspect  the same, but the band is round(w*H/W) rows: the output aspect at
                               full input width, not stretched (skips the same images)
      center-crop-dhariwal     ADM's ImageNet recipe: box-filter halving, bicubic, centre crop
    """
    with cli.one_line_errors():
        convert_dataset(source, dest, max_images=max_images, transform=transform, resolution=resolution)


# fmt: off
@cmdline.command()
@_vae_option
@click.option("--source", help="Input folder or ZIP archive of images", metavar="PATH", type=str, required=True)
@_dest_option
@click.option("--max-images", help="Maximum number of images to encode", metavar="INT", type=click.IntRange(min=1))
@click.option("--stats-images", help="Measure the latent statistics on this many images (a fixed random subset)  [default: all]", metavar="INT", type=click.IntRange(min=1))
@_batch_option
# fmt: on
def encode(
    model_url: str, source: str, dest: str, max_images: Optional[int], stats_images: Optional[int], batch: int
) -> None:
    """Encode images into VAE latents (mean and std, float32 .npy).

    dataset.json records the VAE, its latent channel count and the per-channel mean and standard
    deviation of the latents' posterior draws, from which training sets up its encoder.
    """
    with cli.one_line_errors():
        encode_dataset(source, dest, model_url=model_url, max_images=max_images, batch=batch, stats_images=stats_images)


# fmt: off
@cmdline.command()
@_decode_vae_option
@click.option("--source", help="Input folder or ZIP archive of latents written by encode", metavar="PATH", required=True)
@_dest_option
@click.option("--max-images", help="Maximum number of images to decode", metavar="INT", type=click.IntRange(min=1))
@click.option("--sample", help="Decode a posterior draw mean + randn*std instead of the mean", is_flag=True)
@click.option("--seed", help="Random seed for --sample", metavar="INT", type=int, default=0, show_default=True)
@_batch_option
# fmt: on
def decode(
    model_url: Optional[str], source: str, dest: str, max_images: Optional[int], sample: bool, seed: int, batch: int
) -> None:
    """Decode VAE latents written by encode back into PNG images."""
    with cli.one_line_errors():
        decode_dataset(source, dest, model_url=model_url, max_images=max_images, sample=sample, seed=seed, batch=batch)


if __name__ == "__main__":
    cmdline()
