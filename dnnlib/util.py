"""Miscellaneous utilities: EasyDict, class lookup by name, the URL download cache, logging.

Reference network pickles run their embedded source against this module (they use
``dnnlib.util.EasyDict``), and snapshot pickles are EasyDicts pickled by this class path, so the
names here are part of the file format.
"""

import contextlib
import glob
import hashlib
import importlib
import io
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator
from typing import IO, Any, BinaryIO, Callable, Optional, TextIO, Union


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
    root = _dnnlib_cache_dir if _dnnlib_cache_dir is not None else os.environ.get("DNNLIB_CACHE_DIR")
    if root is None:
        home = next((os.environ[key] for key in ("HOME", "USERPROFILE") if key in os.environ), tempfile.gettempdir())
        root = os.path.join(home, ".cache", "dnnlib")
    return os.path.join(root, *paths)


def format_time(seconds: Union[int, float]) -> str:
    """Human-readable duration: ``Ns``, ``Mm SSs``, ``Hh MMm SSs`` or ``Dd HHh MMm``."""
    s = int(round(seconds))  # round half to even, like np.rint
    if s < 60:
        return f"{s}s"
    if s < 60 * 60:
        return f"{s // 60}m {s % 60:02}s"
    if s < 24 * 60 * 60:
        return f"{s // 3600}h {(s // 60) % 60:02}m {s % 60:02}s"
    return f"{s // 86400}d {(s // 3600) % 24:02}h {(s // 60) % 60:02}m"


class _Tee:
    """A text stream that writes to an original stream and to the logger's file."""

    def __init__(self, stream: TextIO, logger: "Logger"):
        self.stream = stream
        self.logger = logger

    def write(self, text: str) -> int:
        if text:
            if self.logger.file is not None:
                self.logger.file.write(text)
                if self.logger.should_flush:
                    self.logger.file.flush()
            self.stream.write(text)
            if self.logger.should_flush:
                self.stream.flush()
        return len(text)

    def flush(self) -> None:
        if self.logger.file is not None:
            self.logger.file.flush()
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, ... of the original stream
        return getattr(self.stream, name)


class Logger:
    """Copy everything printed to stdout and stderr into a file (none for ``file_name=None``) until
    close(); usable as a context manager. Both streams still reach their original targets."""

    def __init__(self, file_name: Optional[str] = None, file_mode: str = "a", should_flush: bool = True):
        self.file = open(file_name, file_mode, encoding="utf-8") if file_name is not None else None
        self.should_flush = should_flush
        self.stdout, self.stderr = sys.stdout, sys.stderr
        sys.stdout = self._stdout_tee = _Tee(self.stdout, self)
        sys.stderr = _Tee(self.stderr, self)

    def __enter__(self) -> "Logger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def write(self, text: str) -> None:
        """Write to the log file and the original stdout."""
        self._stdout_tee.write(text)

    def flush(self) -> None:
        self._stdout_tee.flush()

    def close(self) -> None:
        """Flush, restore sys.stdout / sys.stderr (if still ours) and close the file."""
        self.flush()
        if isinstance(sys.stdout, _Tee) and sys.stdout.logger is self:
            sys.stdout = self.stdout
        if isinstance(sys.stderr, _Tee) and sys.stderr.logger is self:
            sys.stderr = self.stderr
        if self.file is not None:
            self.file.close()
            self.file = None


def get_obj_by_name(name: str) -> Any:
    """The object called ``name``, e.g. ``'training.networks_edm2.Precond'`` or ``'numpy.random.seed'``:
    the longest importable module prefix, then the rest as attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # Only "this candidate does not exist" means: try a shorter prefix. A module that
            # exists but fails inside its own imports must report that error.
            if err.name is not None and (module_name == err.name or module_name.startswith(err.name + ".")):
                continue
            raise
        for depth, attr in enumerate(parts[i:]):
            if not hasattr(obj, attr):
                owner = ".".join(parts[: i + depth])
                raise ImportError(f"Cannot find '{name}': '{owner}' has no attribute '{attr}'")
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"Cannot find '{name}': no module named '{parts[0]}'")


def call_func_by_name(*args: Any, func_name: Union[str, Callable], **kwargs: Any) -> Any:
    """Call ``func_name`` (a callable, or the dotted name of one) with the given arguments."""
    func_obj = get_obj_by_name(func_name) if isinstance(func_name, str) else func_name
    if not callable(func_obj):
        raise TypeError(f"'{func_name}' is not callable")
    return func_obj(*args, **kwargs)


def construct_class_by_name(*args: Any, class_name: Union[str, type], **kwargs: Any) -> Any:
    """Instantiate ``class_name`` (a class, or the dotted name of one) with the given arguments."""
    return call_func_by_name(*args, func_name=class_name, **kwargs)


class SizedIterable:
    """An iterable with a length known in advance: every ``iter()`` runs ``make_iter()`` afresh.
    The tools return their lazily computed batches this way."""

    def __init__(self, make_iter: Callable[[], Iterable], length: int):
        self._make_iter = make_iter
        self._length = int(length)

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator:
        return iter(self._make_iter())


# Atomic writes: every output file (and folder) is written under a temporary name in its own folder
# and renamed into place only when complete, so an interrupted run never leaves a truncated file
# under the final name. One temporary-name scheme for the whole project: ".{name}.{12 hex digits}.tmp".
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{12}\.tmp")


def temp_path_for(path: str) -> str:
    """A fresh temporary name next to ``path``."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")


def _remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(OSError):
            os.remove(path)


@contextlib.contextmanager
def atomic_path(path: str, make_dirs: bool = True) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, else remove it. For
    writers that need a path (PIL, zipfile, a whole folder). A file is fsynced before the rename; an
    existing folder at ``path`` is replaced only if empty (``os.replace`` cannot replace a full one)."""
    if make_dirs:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temp = temp_path_for(path)
    try:
        yield temp
        if os.path.isfile(temp):
            with open(temp, "rb+") as f:
                os.fsync(f.fileno())
        if os.path.isdir(temp) and os.path.isdir(path):
            os.rmdir(path)
        os.replace(temp, path)
    finally:
        _remove_path(temp)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing; rename it to ``path`` when the block ends
    without an exception (after flush and fsync), remove it otherwise."""
    assert "w" in mode or "x" in mode, "atomic_write is for writing"
    with atomic_path(path) as temp:
        with open(temp, mode.replace("x", "w"), **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def remove_stale_temp_files(folder: str) -> list:
    """Remove the temporary files of ``atomic_path`` that an interrupted (e.g. killed) process left
    in ``folder``; returns the removed names. Only names of the atomic-write scheme are touched."""
    try:
        removed = [name for name in os.listdir(folder) if _TEMP_NAME.fullmatch(name)]
    except OSError:
        return []
    for name in removed:
        _remove_path(os.path.join(folder, name))
    return removed


def one_line(err: BaseException) -> str:
    """An exception as one line of text (how the tools show library errors): its message with white
    space folded, else its type name. Of an error re-raised from a data-loader worker, which carries
    the worker's traceback, only the last line is kept, without its ``SomeError:`` prefix."""
    text = str(err)
    if "Traceback (most recent call last)" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        text = re.sub(r"^[A-Za-z_.]*(Error|Exception): ", "", lines[-1])
    text = " ".join(text.split())
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.strerror}: {err.filename}"
    return text or type(err).__name__


# Checks of command-line arguments, made before any expensive work. Each raises ValueError (or
# FileNotFoundError) with a one-line message naming the option.


def _local_path(path: str) -> Optional[str]:
    """The local path of a path or ``file://`` URL; None for other URLs."""
    if path.startswith("file://"):
        path = urllib.parse.unquote(urllib.parse.urlparse(path).path)
        return path[1:] if re.match(r"^/[a-zA-Z]:", path) else path  # file:///C:/... on Windows
    return None if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path) else path


def check_input_file(path: str, option: str, what: str = "input file", allow_dir: bool = False) -> None:
    """Fail unless the local file ``path`` exists (URLs other than ``file://`` are checked when opened);
    ``allow_dir`` also accepts a folder."""
    local = _local_path(path)
    if local is None:
        return
    if not os.path.exists(local):
        raise FileNotFoundError(f'Cannot open {what} "{path}" ({option}): it does not exist')
    if os.path.isdir(local) and not allow_dir:
        raise ValueError(f'Cannot open {what} "{path}" ({option}): it is a folder, not a file')


def check_input_dir(path: str, option: str, what: str = "input directory") -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f'Cannot open {what} "{path}" ({option}): it does not exist')
    if not os.path.isdir(path):
        raise ValueError(f'Cannot open {what} "{path}" ({option}): it is a file, not a folder')


def _unwritable_reason(folder: str, target: str) -> Optional[str]:
    """Why ``folder`` could not be created or written to, for writing ``target`` (None if it can)."""
    folder = os.path.abspath(folder)
    while not os.path.lexists(folder):  # nothing is created: look at the nearest existing ancestor
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return "it is a file" if folder == os.path.abspath(target) else f'"{folder}" is a file'
    if not os.access(folder, os.W_OK | os.X_OK):
        return f'no permission to write in "{folder}"'
    return None


def check_output_dir(path: str, option: str, what: str = "output directory") -> None:
    reason = _unwritable_reason(path, path)
    if reason is not None:
        raise ValueError(f'Cannot create {what} "{path}" ({option}): {reason}')


def check_output_file(path: str, option: str, what: str = "output file") -> None:
    folder = os.path.dirname(os.path.abspath(path))
    reason = "it is a folder" if os.path.isdir(path) else _unwritable_reason(folder, path)
    if reason is not None:
        raise ValueError(f'Cannot write {what} "{path}" ({option}): {reason}')


retry_delay: float = 1.0  # seconds between download attempts (tests make this short)
progress_min_bytes: int = 1 << 20  # show a tqdm bar for downloads at least this large (or of unknown size)


def is_url(obj: Any, allow_file_urls: bool = False) -> bool:
    """Whether ``obj`` is a string of the form ``scheme://host/...`` (``file://`` only if allowed)."""
    if not isinstance(obj, str) or "://" not in obj:
        return False
    if obj.startswith("file://"):
        return allow_file_urls
    try:
        res = urllib.parse.urlparse(obj)
    except ValueError:
        return False
    return bool(res.scheme) and bool(res.netloc)


def cache_file_name(url: str, content_disposition: Optional[str] = None) -> str:
    """The download cache's file name for ``url``, as the reference names it: ``{md5(url)}_{name}``, the
    name being the server's Content-Disposition filename, else the URL, with every character outside
    ``[0-9a-zA-Z-._]`` replaced by ``_`` and cut to 128 characters."""
    header = content_disposition or ""
    match = re.search(r'filename="([^"]*)"', header) or re.search(r"filename=([^;\s]+)", header)
    safe_name = re.sub(r"[^0-9A-Za-z._-]", "_", match.group(1) if match else url)[:128]
    return f"{hashlib.md5(url.encode('utf-8')).hexdigest()}_{safe_name}"


def _error_summary(err: BaseException) -> str:
    import requests

    if isinstance(err, requests.HTTPError) and err.response is not None:
        return f"HTTP {err.response.status_code} {err.response.reason}".strip()
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _download_once(url: str, cache_dir: str, cache: bool, verbose: bool, timeout: float) -> Union[str, bytes]:
    """One download attempt: the cache path (cache=True) or the bytes. Raises on any failure."""
    import requests
    from tqdm import tqdm

    with requests.get(url, stream=True, timeout=timeout, allow_redirects=True) as res:
        res.raise_for_status()
        expected = res.headers.get("Content-Length")
        expected = int(expected) if expected is not None and expected.isdigit() else None
        fname = cache_file_name(url, res.headers.get("Content-Disposition"))
        show_bar = verbose and (expected is None or expected >= progress_min_bytes)
        bar = tqdm(
            total=expected,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=fname[33:][:40],
            disable=not show_bar,
            leave=False,
            file=sys.stderr,
        )

        def chunks():
            for chunk in res.iter_content(chunk_size=1 << 20):
                bar.update(len(chunk))
                yield chunk
            # Content-Length counts bytes on the wire (before any content decoding).
            received = res.raw.tell()
            if expected is not None and received != expected:
                raise OSError(f"connection closed after {received} of {expected} bytes")

        try:
            if not cache:
                return b"".join(chunks())
            os.makedirs(cache_dir, exist_ok=True)
            final_path = os.path.join(cache_dir, fname)
            # The temporary name (".{md5}_*.tmp") does not match the "{md5}_*" lookup, so a partial
            # file is never used.
            with atomic_write(final_path) as f:
                for chunk in chunks():
                    f.write(chunk)
            return final_path
        finally:
            bar.close()


def open_url(
    url: str,
    cache_dir: Optional[str] = None,
    num_attempts: int = 10,
    verbose: bool = True,
    return_filename: bool = False,
    cache: bool = True,
    retry_delay: Optional[float] = None,
    timeout: float = 60.0,
) -> Union[BinaryIO, str]:
    """Open a local path, a ``file://`` URL or an http(s) URL as a binary file object.

    http(s) downloads are cached in ``cache_dir`` (default ``make_cache_dir_path('downloads')``)
    as ``{md5(url)}_{name}``; a cached file is reused when exactly one matches the URL. Each
    download is streamed into a temporary file in the cache folder and renamed only when complete,
    and retried ``num_attempts`` times, ``retry_delay`` seconds apart (default: the module-level
    ``retry_delay``). ``return_filename=True`` returns the local path instead (needs the cache).
    Raises a one-line ``OSError`` naming the URL when every attempt fails.
    """
    if num_attempts < 1:
        raise ValueError("num_attempts must be at least 1")
    if return_filename and not cache:
        raise ValueError("return_filename=True requires cache=True")
    local = _local_path(url)
    if local is not None:
        return local if return_filename else open(local, "rb")
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise OSError(f"Cannot open {url}: unsupported URL scheme '{scheme}'")

    if cache_dir is None:
        cache_dir = make_cache_dir_path("downloads")
    if cache:
        url_md5 = hashlib.md5(url.encode("utf-8")).hexdigest()
        matches = glob.glob(os.path.join(glob.escape(cache_dir), url_md5 + "_*"))
        if len(matches) == 1:
            return matches[0] if return_filename else open(matches[0], "rb")

    delay = globals()["retry_delay"] if retry_delay is None else retry_delay
    if verbose:
        print(f"Downloading {url} ...", end="", flush=True)
    for attempt in range(num_attempts):
        if attempt > 0 and delay > 0:
            time.sleep(delay)
        try:
            result = _download_once(url, cache_dir, cache, verbose, timeout)
            break
        except Exception as err:  # noqa: BLE001 -- any failure is retried, then reported
            error = err
    else:
        if verbose:
            print(" failed")
        plural = "s" if num_attempts != 1 else ""
        raise OSError(f"Failed to download {url} ({num_attempts} attempt{plural}): {_error_summary(error)}") from error
    if verbose:
        print(" done")
    if isinstance(result, bytes):
        return io.BytesIO(result)
    return result if return_filename else open(result, "rb")
