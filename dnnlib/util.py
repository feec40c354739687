"""Miscellaneous utilities: EasyDict, class lookup by name, the URL download cache, logging."""

import os
import tempfile
from typing import Any, Optional


class EasyDict(dict):
    """A dict whose items can also be read and written as attributes (``d.key``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]


_dnnlib_cache_dir: Optional[str] = None


def set_cache_dir(path: Optional[str]) -> None:
    """Override where downloads and other cached files go (None restores the default)."""
    global _dnnlib_cache_dir
    _dnnlib_cache_dir = path


def make_cache_dir_path(*paths: str) -> str:
    """Path inside the cache root: set_cache_dir(), $DNNLIB_CACHE_DIR, $HOME/.cache/dnnlib,
    %USERPROFILE%/.cache/dnnlib, else the temporary directory."""
    if _dnnlib_cache_dir is not None:
        return os.path.join(_dnnlib_cache_dir, *paths)
    if "DNNLIB_CACHE_DIR" in os.environ:
        return os.path.join(os.environ["DNNLIB_CACHE_DIR"], *paths)
    if "HOME" in os.environ:
        return os.path.join(os.environ["HOME"], ".cache", "dnnlib", *paths)
    if "USERPROFILE" in os.environ:
        return os.path.join(os.environ["USERPROFILE"], ".cache", "dnnlib", *paths)
    return os.path.join(tempfile.gettempdir(), ".cache", "dnnlib", *paths)
