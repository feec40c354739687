"""Small utilities shared by every part of the project (and by pickles that embed code)."""

from .util import EasyDict, make_cache_dir_path

__all__ = ["EasyDict", "make_cache_dir_path"]
