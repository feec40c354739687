"""Datasets of images or latents stored as a folder or a ZIP archive (`dataset_tool.py` writes them).

Items are Pillow-readable images (uint8) or `.npy` arrays (e.g. 8-channel VAE mean/std latents), sorted by
path, plus an optional `dataset.json`: `{"labels": [["00000/img00000000.png", 6], ...]}` or `{"labels": null}`,
possibly with other keys (e.g. "vae" from `dataset_tool.py encode`), which only their readers look at.
Integer labels become one-hot float32 vectors; lists of floats are used as they are. Nothing that grows with
the number of images is kept in memory unless `cache=True`. Bad paths and files raise OSError.
"""

import contextlib
import json
import os
import zipfile
from typing import Any, Optional

import numpy as np
import PIL.Image
import torch

import dnnlib

# ----------------------------------------------------------------------------
# Abstract base: index bookkeeping (max_size subset, x-flips), labels, properties.


class Dataset(torch.utils.data.Dataset):
    """A list of CHW numpy arrays with optional labels; subclasses provide the raw loading."""

    def __init__(
        self,
        name: str,  # Name of the dataset.
        raw_shape: list,  # Shape of the raw data, [N, C, H, W].
        use_labels: bool = True,  # Enable conditioning labels? False = label dimension is zero.
        max_size: Optional[int] = None,  # Use a random subset of at most this many raw items. Applied before xflip.
        xflip: bool = False,  # Double the dataset with mirrored copies. Applied after max_size.
        random_seed: int = 0,  # Seed for choosing the max_size subset.
        cache: bool = False,  # Keep loaded items in CPU memory?
    ):
        self._name = name
        self._raw_shape = list(raw_shape)
        self._use_labels = use_labels
        self._cache = cache
        self._cached_images: dict = {}  # {raw_idx: np.ndarray}
        self._raw_labels: Optional[np.ndarray] = None
        self._label_shape: Optional[list] = None

        # max_size: a seeded shuffle of all raw indices, keep the first max_size, back in file order.
        self._raw_idx = np.arange(self._raw_shape[0], dtype=np.int64)
        if max_size is not None and self._raw_idx.size > max_size:
            np.random.RandomState(random_seed % (1 << 31)).shuffle(self._raw_idx)
            self._raw_idx = np.sort(self._raw_idx[:max_size])

        # xflip: the same raw items again, this time mirrored.
        self._xflip = np.zeros(self._raw_idx.size, dtype=np.uint8)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    # Subclass interface.
    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        raise NotImplementedError

    def _load_raw_labels(self) -> Optional[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Release open file handles (they are reopened on demand)."""

    def _get_raw_labels(self) -> np.ndarray:
        if self._raw_labels is None:
            labels = self._load_raw_labels() if self._use_labels else None
            if labels is None:
                labels = np.zeros([self._raw_shape[0], 0], dtype=np.float32)
            assert isinstance(labels, np.ndarray) and labels.shape[0] == self._raw_shape[0]
            assert labels.dtype in (np.float32, np.int64)
            if labels.dtype == np.int64:
                assert labels.ndim == 1 and np.all(labels >= 0)
            self._raw_labels = labels
        return self._raw_labels

    def __getstate__(self) -> dict:
        # Labels are reloaded lazily by whoever unpickles us.
        return dict(self.__dict__, _raw_labels=None)

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def __len__(self) -> int:
        return self._raw_idx.size

    def __getitem__(self, idx: int) -> tuple:
        raw_idx = int(self._raw_idx[idx])
        image = self._cached_images.get(raw_idx)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if list(image.shape) != self._raw_shape[1:]:
                raise OSError(
                    f'Item {raw_idx} of dataset "{self._name}" has shape {list(image.shape)}, '
                    f"expected {self._raw_shape[1:]} like the first item"
                )
            if self._cache:
                self._cached_images[raw_idx] = image
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def get_label(self, idx: int) -> np.ndarray:
        """The label of item idx: a one-hot float32 vector for integer labels, else the stored vector."""
        label = self._get_raw_labels()[self._raw_idx[idx]]
        if label.dtype == np.int64:
            onehot = np.zeros(self.label_shape, dtype=np.float32)
            onehot[label] = 1
            label = onehot
        return label.copy()

    def get_details(self, idx: int) -> dnnlib.EasyDict:
        """Where item idx comes from: raw_idx (file index), xflip, raw_label."""
        raw_idx = int(self._raw_idx[idx])
        xflip = int(self._xflip[idx]) != 0
        return dnnlib.EasyDict(raw_idx=raw_idx, xflip=xflip, raw_label=self._get_raw_labels()[raw_idx].copy())

    @property
    def name(self) -> str:
        return self._name

    @property
    def image_shape(self) -> list:  # [C, H, W]
        return list(self._raw_shape[1:])

    @property
    def num_channels(self) -> int:
        assert len(self.image_shape) == 3  # CHW
        return self.image_shape[0]

    @property
    def resolution(self) -> int:
        assert len(self.image_shape) == 3  # CHW
        assert self.image_shape[1] == self.image_shape[2]
        return self.image_shape[1]

    @property
    def label_shape(self) -> list:
        if self._label_shape is None:
            raw_labels = self._get_raw_labels()  # One-hot over 0..max for integer labels.
            onehot = raw_labels.dtype == np.int64
            self._label_shape = [int(np.max(raw_labels)) + 1] if onehot else list(raw_labels.shape[1:])
        return list(self._label_shape)

    @property
    def label_dim(self) -> int:
        assert len(self.label_shape) == 1
        return self.label_shape[0]

    @property
    def has_labels(self) -> bool:
        return any(x != 0 for x in self.label_shape)

    @property
    def has_onehot_labels(self) -> bool:
        return self._get_raw_labels().dtype == np.int64


# ----------------------------------------------------------------------------
# A folder or ZIP of PNG (or other Pillow-readable) images or .npy arrays.


def file_ext(name: str) -> str:
    """The extension of a file name, with the dot, in lower case."""
    return os.path.splitext(name)[1].lower()


def image_extensions() -> set:
    """Extensions (with the dot, lower case) of every image format Pillow can read."""
    PIL.Image.init()  # registers every plugin, so EXTENSION is complete
    return set(PIL.Image.EXTENSION.keys())


def list_folder(path: str) -> list:
    """The files under a folder: sorted paths relative to it, '/' separated. Symbolic links are followed (a tree
    of links to the class folders is a common way to assemble a dataset), except links back to an ancestor."""
    names = []

    def walk(folder: str, prefix: str, ancestors: frozenset) -> None:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir():  # follows symbolic links, as is_file() does
                    st = os.stat(entry.path)  # not entry.stat(): it has no inode numbers on Windows
                    key = (st.st_dev, st.st_ino)
                    if key not in ancestors:
                        walk(entry.path, f"{prefix}{entry.name}/", ancestors | {key})
                elif entry.is_file():
                    names.append(prefix + entry.name)

    st = os.stat(path)
    walk(path, "", frozenset([(st.st_dev, st.st_ino)]))
    return sorted(names)


def check_labelled_files_exist(labelled: Any, files: Any, where: str) -> None:
    """Fail (OSError) if dataset.json labels files that the dataset does not have: their labels would
    otherwise be lost without a word. `labelled`: the labelled names; `files`: a set of file names."""
    absent = [name for name in labelled if name not in files]
    if absent:
        shown = ", ".join(absent[:5]) + (", ..." if len(absent) > 5 else "")
        raise OSError(f"dataset.json in {where} labels {len(absent)} file(s) that it does not contain: {shown}")


class ImageFolderDataset(Dataset):
    """Images or latents in a directory (searched recursively, following symbolic links) or a ZIP archive."""

    def __init__(
        self,
        path: str,  # Path to a directory or a .zip file.
        resolution: Optional[int] = None,  # Expected resolution; None = whatever the files have.
        **super_kwargs: Any,  # use_labels, max_size, xflip, random_seed, cache.
    ):
        self._path = str(path)
        self._zipfile: Optional[zipfile.ZipFile] = None
        self._zipfile_pid: Optional[int] = None

        if os.path.isdir(self._path):
            self._type = "dir"
            all_fnames = list_folder(self._path)
        elif not os.path.exists(self._path):
            raise OSError(f"Dataset path does not exist: {self._path}")
        elif file_ext(self._path) == ".zip":
            self._type = "zip"
            try:
                all_fnames = self._get_zipfile().namelist()
            except (zipfile.BadZipFile, OSError) as err:
                raise OSError(f"Cannot read ZIP archive {self._path}: {err}") from None
        else:
            raise OSError(f"Dataset path must be a directory or a .zip file: {self._path}")

        supported = image_extensions() | {".npy"}
        self._has_json = "dataset.json" in all_fnames
        # One numpy array of UTF-8 bytes (which sort as the names do) rather than a list of str objects: forked
        # data-loader workers that touch the reference counts of millions of small objects copy their memory.
        self._image_fnames = np.array(sorted(f.encode("utf8") for f in all_fnames if file_ext(f) in supported))
        del all_fnames
        if len(self._image_fnames) == 0:
            raise OSError(f"No image or .npy files found in {self._path}")

        name = os.path.splitext(os.path.basename(os.path.normpath(self._path)))[0]
        raw_shape = [len(self._image_fnames)] + list(self._load_raw_image(0).shape)
        self.close()  # Open again lazily in whichever process reads items.
        if resolution is not None and (raw_shape[2] != resolution or raw_shape[3] != resolution):
            raise OSError(
                f"Images in {self._path} are {raw_shape[3]}x{raw_shape[2]}, but resolution {resolution} was requested"
            )
        super().__init__(name=name, raw_shape=raw_shape, **super_kwargs)

    def _get_zipfile(self) -> zipfile.ZipFile:
        assert self._type == "zip"
        # A handle inherited through fork() shares its file position with the parent: open our own.
        if self._zipfile is None or self._zipfile_pid != os.getpid():
            self._zipfile = zipfile.ZipFile(self._path)
            self._zipfile_pid = os.getpid()
        return self._zipfile

    def _open_file(self, fname: str):
        if self._type == "dir":
            return open(os.path.join(self._path, fname), "rb")
        return self._get_zipfile().open(fname, "r")

    def close(self) -> None:
        try:
            # Only the process that opened the handle closes it.
            if self._zipfile is not None and self._zipfile_pid == os.getpid():
                self._zipfile.close()
        finally:
            self._zipfile = self._zipfile_pid = None

    def __getstate__(self) -> dict:
        return dict(super().__getstate__(), _zipfile=None, _zipfile_pid=None)

    def _fname(self, raw_idx: int) -> str:
        return self._image_fnames[raw_idx].decode("utf8")

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        fname = self._fname(raw_idx)
        try:
            with self._open_file(fname) as f:
                if file_ext(fname) == ".npy":
                    image = np.load(f)
                    image = image.reshape(-1, *image.shape[-2:])  # [C, H, W]
                else:
                    image = np.array(PIL.Image.open(f))  # no RGB conversion: grayscale stays 1 channel
                    image = image.reshape(*image.shape[:2], -1).transpose(2, 0, 1)  # HW(C) -> CHW
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise OSError(f"Cannot read {fname} in {self._path}: {err}") from None
        return image

    def load_dataset_json(self) -> dict:
        """The whole dataset.json ({} if there is none): "labels", and whatever else the writer stored
        (e.g. "vae", the VAE and latent statistics of `dataset_tool.py encode`; readers ignore unknown keys)."""
        if not self._has_json:
            return {}
        try:
            with self._open_file("dataset.json") as f:
                data = json.load(f)
        except ValueError as err:
            raise OSError(f"Cannot parse dataset.json in {self._path}: {err}") from None
        if not isinstance(data, dict):
            raise OSError(f"dataset.json in {self._path} is not a JSON object")
        return data

    def _load_raw_labels(self) -> Optional[np.ndarray]:
        if not self._has_json:
            return None
        labels = self.load_dataset_json().get("labels")
        if labels is None:
            return None
        labels = dict(labels)  # {relative path with '/': label}
        fnames = [self._fname(i) for i in range(len(self._image_fnames))]
        check_labelled_files_exist(labels, set(fnames), self._path)
        missing = [f for f in fnames if f not in labels]
        if missing:
            raise OSError(
                f"dataset.json in {self._path} has no label for {missing[0]} "
                f"({len(missing)} of {len(fnames)} files unlabelled)"
            )
        try:
            labels = np.array([labels[f] for f in fnames])
        except ValueError:
            labels = np.zeros([0, 0, 0])  # ragged lists: rejected below
        if labels.ndim not in (1, 2) or labels.dtype.kind not in "biuf":
            raise OSError(f"Labels in {self._path}/dataset.json must be integers or lists of numbers of equal length")
        return labels.astype({1: np.int64, 2: np.float32}[labels.ndim])
