"""Create datasets for training and evaluation (spec §6).

    convert  images (folder tree or ZIP) -> uncompressed PNGs, optionally cropped and resized
    encode   PNG dataset -> Stable Diffusion VAE latents (mean and std, 8 channels, float32 .npy)
    decode   latent dataset -> PNG images (the mean by default, or a posterior draw with --sample)

Every output is a ZIP archive (ZIP_STORED) or an empty folder holding `00000/img00000000.png` style
files and a `dataset.json` with the labels (`null` unless every image has one). Outputs are written
under a temporary name beside the destination and renamed when complete, so a failure never leaves a
half-written dataset behind.
"""

import io
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator, Optional

import click
import numpy as np
import PIL.Image
from tqdm import tqdm

# ----------------------------------------------------------------------------
# Reading a source: a folder tree or a ZIP archive.


def _file_ext(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def image_extensions() -> set:
    """Extensions (with dot, lower case) of every image format Pillow can read."""
    PIL.Image.init()  # registers all plugins, so EXTENSION is complete
    return set(PIL.Image.EXTENSION.keys())


@dataclass
class SourceFile:
    name: str  # path relative to the source root, '/' separated
    label: Any  # label from dataset.json or the top-level folder name; None = unlabelled


class Source:
    """The image (or .npy) files of a folder tree or a ZIP archive, sorted by name, with their labels.

    Labels come from a `dataset.json` in the root; failing that, for a folder, from the names of the
    top-level folders (sorted, numbered from 0) when there are at least two of them.
    """

    def __init__(self, path: str, exts: set, max_files: Optional[int] = None):
        self.path = path
        self._zip: Optional[zipfile.ZipFile] = None
        if os.path.isdir(path):
            names = []
            for root, _dirs, files in os.walk(path):
                rel_root = os.path.relpath(root, path)
                names += [(f if rel_root == '.' else os.path.join(rel_root, f)).replace(os.sep, '/') for f in files]
        elif not os.path.exists(path):
            raise click.ClickException(f'Source does not exist: {path}')
        elif _file_ext(path) != '.zip':
            raise click.ClickException(f'Source must be a folder or a .zip archive: {path}')
        else:
            try:
                self._zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as err:
                raise click.ClickException(f'Source is not a readable ZIP archive: {path} ({err})') from None
            names = self._zip.namelist()

        labels = self._read_labels(names)
        names = sorted(n for n in names if _file_ext(n) in exts)
        if len(labels) == 0 and self._zip is None:
            labels = self._folder_labels(names)
        if len(names) == 0:
            kinds = '/'.join(sorted(exts)) if len(exts) <= 3 else 'image'
            raise click.ClickException(f'No {kinds} files found in {path}')
        if max_files is not None:
            names = names[:max_files]
        self.files = [SourceFile(name=n, label=labels.get(n)) for n in names]

    def _read_labels(self, names: list) -> dict:
        if 'dataset.json' not in names:
            return {}
        try:
            with self.open('dataset.json') as f:
                labels = json.load(f).get('labels')
            return {} if labels is None else {name: label for name, label in labels}
        except (ValueError, TypeError, AttributeError, OSError) as err:
            raise click.ClickException(f'Cannot parse dataset.json in {self.path}: {err}') from None

    @staticmethod
    def _folder_labels(names: list) -> dict:
        # Files directly in the root count as one more class, named '' (the reference does the same).
        toplevel = {name: name.split('/')[0] if '/' in name else '' for name in names}
        classes = {cls: idx for idx, cls in enumerate(sorted(set(toplevel.values())))}
        if len(classes) < 2:
            return {}
        return {name: classes[cls] for name, cls in toplevel.items()}

    def open(self, name: str) -> BinaryIO:
        if self._zip is not None:
            return self._zip.open(name, 'r')
        return open(os.path.join(self.path, name), 'rb')

    def read_image(self, file: SourceFile) -> np.ndarray:
        """Pixels of an image file as HWC uint8 RGB."""
        try:
            with self.open(file.name) as f:
                return np.array(PIL.Image.open(f).convert('RGB'))
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise click.ClickException(f'Cannot read image {file.name}: {err}') from None

    def read_npy(self, file: SourceFile) -> np.ndarray:
        try:
            with self.open(file.name) as f:
                return np.load(f)
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise click.ClickException(f'Cannot read array {file.name}: {err}') from None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


# ----------------------------------------------------------------------------
# Writing a destination: a ZIP archive or an empty folder, under a temporary name until complete.


class DatasetWriter:
    """Writes `name -> bytes` into `dest` (ZIP_STORED archive if it ends in .zip, else a folder).

    Everything goes to a temporary file or folder in the same parent folder first; `commit()` renames it
    to `dest`, `abort()` deletes it. Used as a context manager it commits on success, aborts on error.
    """

    def __init__(self, dest: str):
        if dest == '':
            raise click.ClickException('--dest must not be an empty string')
        self.dest = dest
        self.is_zip = _file_ext(dest) == '.zip'
        if self.is_zip and os.path.isdir(dest):
            raise click.ClickException(f'--dest is a folder, not a ZIP file: {dest}')
        if not self.is_zip and os.path.exists(dest) and not os.path.isdir(dest):
            raise click.ClickException(f'--dest exists and is not a folder (name a .zip to write an archive): {dest}')
        if not self.is_zip and os.path.isdir(dest) and len(os.listdir(dest)) != 0:
            raise click.ClickException(f'--dest folder must be empty: {dest}')
        parent = os.path.dirname(os.path.abspath(dest))
        os.makedirs(parent, exist_ok=True)
        prefix = f'.{os.path.basename(os.path.normpath(dest))}.tmp-'
        if self.is_zip:
            fd, self._tmp = tempfile.mkstemp(dir=parent, prefix=prefix)
            os.close(fd)
            self._zip: Optional[zipfile.ZipFile] = zipfile.ZipFile(self._tmp, mode='w', compression=zipfile.ZIP_STORED)
        else:
            self._tmp = tempfile.mkdtemp(dir=parent, prefix=prefix)
            self._zip = None

    def write(self, name: str, data: Any) -> None:
        if isinstance(data, str):
            data = data.encode('utf8')
        if self._zip is not None:
            self._zip.writestr(name, bytes(data))
            return
        path = os.path.join(self._tmp, *name.split('/'))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(data)

    def commit(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None
            os.chmod(self._tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        elif os.path.isdir(self.dest):
            os.rmdir(self.dest)  # checked to be empty; rename() cannot replace a folder everywhere
        os.replace(self._tmp, self.dest)

    def abort(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None
        if os.path.isdir(self._tmp):
            shutil.rmtree(self._tmp, ignore_errors=True)
        elif os.path.exists(self._tmp):
            os.remove(self._tmp)

    def __enter__(self) -> 'DatasetWriter':
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def image_name(idx: int) -> str:
    """Archive name of output image idx: 00000/img00000000.png (the folder is the first five digits)."""
    s = f'{idx:08d}'
    return f'{s[:5]}/img{s}.png'


def latent_name(idx: int) -> str:
    """Archive name of encoded image idx: 00000/img-mean-std-00000000.npy."""
    s = f'{idx:08d}'
    return f'{s[:5]}/img-mean-std-{s}.npy'


def png_bytes(img: np.ndarray) -> bytes:
    """HWC uint8 RGB -> uncompressed PNG."""
    buf = io.BytesIO()
    PIL.Image.fromarray(img).save(buf, format='png', compress_level=0, optimize=False)
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def labels_json(labels: list) -> str:
    """dataset.json: the [name, label] pairs, or null unless every written file has a label."""
    return json.dumps({'labels': labels if all(x is not None for x in labels) else None})


# ----------------------------------------------------------------------------
# Transforms: HWC uint8 RGB in, HWC uint8 RGB out (None = skip this image).


def parse_resolution(s: Optional[str]) -> Optional[tuple]:
    """'512x512' or '512,512' -> (512, 512)."""
    if s is None:
        return None
    parts = s.lower().replace(',', 'x').split('x')
    try:
        w, h = (int(p) for p in parts)
    except ValueError:
        raise click.BadParameter(f'expected WxH or W,H with positive integers, got {s!r}', param_hint='--resolution') from None
    if w <= 0 or h <= 0:
        raise click.BadParameter(f'width and height must be positive, got {s!r}', param_hint='--resolution')
    return w, h


def _resize(img: np.ndarray, width: int, height: int, resample: int) -> np.ndarray:
    if img.shape[1] == width and img.shape[0] == height:
        return img
    return np.array(PIL.Image.fromarray(img).resize((width, height), resample))


def scale(width: Optional[int], height: Optional[int], img: np.ndarray) -> np.ndarray:
    """No transform: resize the whole image to the resolution, if one is given (Lanczos)."""
    return _resize(img, width or img.shape[1], height or img.shape[0], PIL.Image.Resampling.LANCZOS)


def center_crop(width: int, height: int, img: np.ndarray) -> np.ndarray:
    """The largest centred square, resized to width x height (Lanczos)."""
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2 : (h + s) // 2, (w - s) // 2 : (w + s) // 2]
    return _resize(img, width, height, PIL.Image.Resampling.LANCZOS)


def center_crop_wide(width: int, height: int, img: np.ndarray) -> Optional[np.ndarray]:
    """Crop the centred band of the output aspect (full input width), resize it to width x height
    (Lanczos), and letterbox it into a black width x width square. Images narrower than the output, or
    too wide for its aspect, are skipped (None).

    The band is round(w·height/width) input rows. (The reference crops round(width·h/w) rows instead,
    a height measured in output pixels, which squashes images whose width differs from the output's.)
    """
    h, w = img.shape[:2]
    if w < width or round(width * h / w) < height:
        return None
    band = min(h, round(w * height / width))
    img = img[(h - band) // 2 : (h + band) // 2]
    img = _resize(img, width, height, PIL.Image.Resampling.LANCZOS)
    canvas = np.zeros([width, width, 3], dtype=np.uint8)
    canvas[(width - height) // 2 : (width + height) // 2] = img
    return canvas


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


TRANSFORMS = ['center-crop', 'center-crop-wide', 'center-crop-dhariwal']


def check_output_size(width: int, height: int) -> None:
    """Training needs square images with a power-of-two side."""
    if width != height:
        raise click.ClickException(f'Images must be square after scale and crop, got {width}x{height}')
    if width < 1 or width & (width - 1) != 0:
        raise click.ClickException(f'Image width/height must be a power of two after scale and crop, got {width}')


def make_transform(transform: Optional[str], resolution: Optional[tuple]) -> Callable[[np.ndarray], Optional[np.ndarray]]:
    """The per-image crop/resize function; checks the options first (before anything is written)."""
    width, height = resolution if resolution is not None else (None, None)
    if transform is None:
        if resolution is not None:
            check_output_size(width, height)
        return lambda img: scale(width, height, img)
    if transform not in TRANSFORMS:
        raise click.BadParameter(f'unknown transform {transform!r}', param_hint='--transform')
    if resolution is None:
        raise click.UsageError(f'--transform={transform} needs --resolution=WxH')
    if transform == 'center-crop':
        check_output_size(width, height)
        return lambda img: center_crop(width, height, img)
    if transform == 'center-crop-wide':
        if height > width:
            raise click.ClickException(f'center-crop-wide letterboxes into a {width}x{width} square, so the height must not exceed the width, got {width}x{height}')
        check_output_size(width, width)
        return lambda img: center_crop_wide(width, height, img)
    check_output_size(width, height)  # center-crop-dhariwal
    return lambda img: center_crop_dhariwal(width, img)


# ----------------------------------------------------------------------------
# The three operations, as plain functions.


def _check_same_size(name: str, shape: tuple, first: Optional[tuple], what: str = 'Image') -> tuple:
    if first is not None and shape != first:
        raise click.ClickException(f'{what} {name} is {shape[1]}x{shape[0]}, but earlier ones are {first[1]}x{first[0]}; '
                                   f'all must have the same size (--resolution resizes images)')
    return shape


def convert_dataset(source: str, dest: str, max_images: Optional[int] = None, transform: Optional[str] = None,
                    resolution: Optional[tuple] = None) -> int:
    """Convert a folder tree or ZIP of images into a dataset of uncompressed PNGs. Returns the image count."""
    transform_image = make_transform(transform, resolution)
    src = Source(source, image_extensions(), max_images)
    try:
        with DatasetWriter(dest) as out:
            labels = []
            first = None
            for idx, file in enumerate(tqdm(src.files, desc='convert', unit='img')):
                img = transform_image(src.read_image(file))
                if img is None:
                    continue  # too small for center-crop-wide; its number stays unused
                if first is None:
                    check_output_size(img.shape[1], img.shape[0])
                first = _check_same_size(file.name, img.shape, first)
                out.write(image_name(idx), png_bytes(img))
                labels.append([image_name(idx), file.label] if file.label is not None else None)
            if first is None:
                raise click.ClickException(f'No image of {source} was large enough for {transform} at {resolution[0]}x{resolution[1]}')
            out.write('dataset.json', labels_json(labels))
    finally:
        src.close()
    return len(labels)


def default_device() -> str:
    import torch

    return 'cuda' if torch.cuda.is_available() else 'cpu'


def _make_vae(model_url: str, batch: int, device: str):
    import torch

    from training.encoders import StabilityVAEEncoder

    vae = StabilityVAEEncoder(vae_name=model_url, batch_size=batch)
    try:
        vae.init(torch.device(device))
    except (OSError, ValueError) as err:
        raise click.ClickException(f'Cannot load the VAE {model_url}: {str(err).splitlines()[0]}') from None
    return vae


def _batches(files: list, batch: int) -> Iterator[list]:
    for i in range(0, len(files), batch):
        yield list(enumerate(files[i : i + batch], start=i))


def _vae_pass(source: str, extensions: Any, dest: str, model_url: str, max_images: Optional[int], batch: int,
              device: Optional[str], desc: str, load_chunk: Any, run_vae: Any, out_name: Any, to_bytes: Any) -> int:
    """The loop shared by encode and decode: read `batch` inputs at a time, run them through the VAE,
    and write one output per input (same index, same label) plus dataset.json, atomically."""
    import torch

    src = Source(source, extensions, max_images)
    try:
        out = DatasetWriter(dest)
        with out:
            device = device or default_device()
            vae = _make_vae(model_url, batch, device)
            labels = []
            with tqdm(total=len(src.files), desc=desc, unit='img') as bar:
                for chunk in _batches(src.files, batch):
                    x = load_chunk(src, chunk).to(device)
                    with torch.no_grad():
                        results = run_vae(vae, x, chunk)
                    for (idx, file), result in zip(chunk, results):
                        out.write(out_name(idx), to_bytes(result))
                        labels.append([out_name(idx), file.label] if file.label is not None else None)
                    bar.update(len(chunk))
            out.write('dataset.json', labels_json(labels))
    finally:
        src.close()
    return len(labels)


def encode_dataset(source: str, dest: str, model_url: str = 'stabilityai/sd-vae-ft-mse', max_images: Optional[int] = None,
                   batch: int = 8, device: Optional[str] = None) -> int:
    """Encode a dataset of images into VAE latents: float32 [8, H/f, W/f] arrays (mean, then std)."""
    import torch

    first = None

    def load_chunk(src, chunk):
        nonlocal first
        images = []
        for _idx, file in chunk:
            img = src.read_image(file)
            first = _check_same_size(file.name, img.shape, first)
            images.append(img)
        return torch.as_tensor(np.stack(images)).permute(0, 3, 1, 2)  # NHWC -> NCHW uint8

    def run_vae(vae, x, chunk):
        return vae.encode_pixels(x).to(torch.float32).cpu().numpy()

    return _vae_pass(source, image_extensions(), dest, model_url, max_images, batch, device, 'encode',
                     load_chunk, run_vae, latent_name, npy_bytes)


def final_latents(vae: Any, mean_std: Any, sample: bool = False, noise: Any = None) -> Any:
    """Raw latents (mean and std, 8 channels) -> the final latents that `vae.decode` takes.

    The mean itself by default; with sample=True the posterior draw mean + noise·std (noise ~ N(0, I)).
    Then the per-channel normalisation of `encode_latents`: final = raw·scale + bias.
    """
    mean, std = mean_std.chunk(2, dim=1)
    raw = mean + noise * std if sample else mean
    scale = raw.new_tensor(vae.scale).reshape(1, -1, 1, 1)
    bias = raw.new_tensor(vae.bias).reshape(1, -1, 1, 1)
    return raw * scale + bias


def decode_dataset(source: str, dest: str, model_url: str = 'stabilityai/sd-vae-ft-mse', max_images: Optional[int] = None,
                   sample: bool = False, seed: int = 0, batch: int = 8, device: Optional[str] = None) -> int:
    """Decode a dataset written by `encode` back into PNG images."""
    import torch

    first = None

    def load_chunk(src, chunk):
        nonlocal first
        arrays = []
        for _idx, file in chunk:
            array = src.read_npy(file)
            if array.ndim != 3 or array.shape[0] != 8:
                raise click.ClickException(f'{file.name} has shape {list(array.shape)}; expected VAE mean and std [8, H, W] as written by encode')
            first = _check_same_size(file.name, array.shape[1:], first, what='Latent')
            arrays.append(array.astype(np.float32))
        return torch.as_tensor(np.stack(arrays))

    def run_vae(vae, x, chunk):
        noise = None
        if sample:  # one generator per image: a draw does not depend on the batch it lands in
            noise = torch.as_tensor(np.stack([np.random.default_rng([seed, idx]).standard_normal([4, *x.shape[2:]], dtype=np.float32)
                                              for idx, _file in chunk])).to(x.device)
        return vae.decode(final_latents(vae, x, sample=sample, noise=noise)).permute(0, 2, 3, 1).cpu().numpy()

    return _vae_pass(source, {'.npy'}, dest, model_url, max_images, batch, device, 'decode',
                     load_chunk, run_vae, image_name, png_bytes)


# ----------------------------------------------------------------------------
# Command line.


@click.group()
def cmdline() -> None:
    """Create datasets: convert images to PNG datasets, encode them to VAE latents, decode latents back.

    \b
    python dataset_tool.py convert --source=downloads/imagenet/train --dest=datasets/img512.zip \\
        --resolution=512x512 --transform=center-crop-dhariwal
    python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip
    python dataset_tool.py decode --source=datasets/img512-sd.zip --dest=decoded/
    """
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        raise click.ClickException('dataset_tool.py runs as a single process; do not launch it with torchrun')


def _resolution_option(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[tuple]:
    return parse_resolution(value)


@cmdline.command()
@click.option('--source', help='Input folder or ZIP archive', metavar='PATH', type=str, required=True)
@click.option('--dest', help='Output folder or ZIP archive', metavar='PATH', type=str, required=True)
@click.option('--max-images', help='Maximum number of input images', metavar='INT', type=click.IntRange(min=1))
@click.option('--transform', help='Input crop/resize mode', type=click.Choice(TRANSFORMS))
@click.option('--resolution', help='Output resolution (e.g. 512x512)', metavar='WxH', callback=_resolution_option)
def convert(source: str, dest: str, max_images: Optional[int], transform: Optional[str], resolution: Optional[tuple]) -> None:
    """Convert an image folder tree or ZIP archive into a dataset (PNG, ZIP or folder).

    \b
    The input is a folder (searched recursively) or a ZIP. Labels come from its dataset.json,
    else from the names of its top-level folders when there are at least two.
    The output images must be square with a power-of-two side, and all equal.
    """
    convert_dataset(source, dest, max_images=max_images, transform=transform, resolution=resolution)


@cmdline.command()
@click.option('--model-url', help='VAE: Hugging Face name or local folder', metavar='URL', type=str, default='stabilityai/sd-vae-ft-mse', show_default=True)
@click.option('--source', help='Input folder or ZIP archive of images', metavar='PATH', type=str, required=True)
@click.option('--dest', help='Output folder or ZIP archive', metavar='PATH', type=str, required=True)
@click.option('--max-images', help='Maximum number of images to encode', metavar='INT', type=click.IntRange(min=1))
@click.option('--batch', help='Images per VAE call', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
def encode(model_url: str, source: str, dest: str, max_images: Optional[int], batch: int) -> None:
    """Encode images into VAE latents (mean and std, float32 .npy)."""
    encode_dataset(source, dest, model_url=model_url, max_images=max_images, batch=batch)


@cmdline.command()
@click.option('--model-url', help='VAE: Hugging Face name or local folder', metavar='URL', type=str, default='stabilityai/sd-vae-ft-mse', show_default=True)
@click.option('--source', help='Input folder or ZIP archive of latents written by encode', metavar='PATH', type=str, required=True)
@click.option('--dest', help='Output folder or ZIP archive', metavar='PATH', type=str, required=True)
@click.option('--max-images', help='Maximum number of images to decode', metavar='INT', type=click.IntRange(min=1))
@click.option('--sample', help='Decode a posterior draw mean + randn*std instead of the mean', is_flag=True)
@click.option('--seed', help='Random seed for --sample', metavar='INT', type=int, default=0, show_default=True)
@click.option('--batch', help='Images per VAE call', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
def decode(model_url: str, source: str, dest: str, max_images: Optional[int], sample: bool, seed: int, batch: int) -> None:
    """Decode VAE latents written by encode back into PNG images."""
    decode_dataset(source, dest, model_url=model_url, max_images=max_images, sample=sample, seed=seed, batch=batch)


if __name__ == '__main__':
    cmdline()
