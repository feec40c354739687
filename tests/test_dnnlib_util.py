"""Tests for dnnlib.util: object lookup by name, format_time, Logger, and open_url with its cache."""

import hashlib
import os
import re
import sys

import pytest

import dnnlib
from dnnlib import util


@pytest.fixture(autouse=True)
def _short_retries(monkeypatch):
    monkeypatch.setattr(util, "retry_delay", 0.01)


def _md5(url: str) -> str:
    return hashlib.md5(url.encode("utf-8")).hexdigest()


def _spec_name(url: str, name: str) -> str:
    # The reference's cache naming written out independently: keep [0-9a-zA-Z-._], replace the rest, cut to 128.
    allowed = set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-._")
    safe = "".join(c if c in allowed else "_" for c in name)[:128]
    return _md5(url) + "_" + safe


# ----------------------------------------------------------------------------
# Names, time formatting, logging.


def test_easydict_and_package_exports():
    d = dnnlib.EasyDict(a=1)
    d.b = 2
    assert d == {"a": 1, "b": 2} and d.a == 1
    del d.a
    with pytest.raises(AttributeError):
        _ = d.a
    assert dnnlib.make_cache_dir_path is util.make_cache_dir_path


def test_construct_and_call_by_name():
    import collections

    od = util.construct_class_by_name([("x", 1)], class_name="collections.OrderedDict")
    assert type(od) is collections.OrderedDict and od["x"] == 1
    assert util.call_func_by_name(3, 4, func_name="math.hypot") == 5.0
    assert util.get_obj_by_name("os.path.join") is os.path.join
    assert util.get_obj_by_name("dnnlib.util.EasyDict") is dnnlib.EasyDict
    assert util.get_obj_by_name("torch.nn.Linear").__name__ == "Linear"  # class attribute of a package


def test_call_and_construct_accept_objects():
    import collections
    import math

    assert util.call_func_by_name(3, 4, func_name=math.hypot) == 5.0
    od = util.construct_class_by_name([("x", 1)], class_name=collections.OrderedDict)
    assert type(od) is collections.OrderedDict and od["x"] == 1
    with pytest.raises(TypeError, match="not callable"):
        util.call_func_by_name(func_name=3.0)


def test_sized_iterable_is_lazy_and_reiterable():
    calls = []

    def make():
        calls.append(1)
        yield from range(3)

    it = util.SizedIterable(make, 3)
    assert len(it) == 3 and calls == []  # nothing runs before iteration
    assert list(it) == [0, 1, 2] and list(it) == [0, 1, 2] and len(calls) == 2


def test_one_line():
    assert util.one_line(ValueError("two\n  lines")) == "two lines"
    assert util.one_line(KeyError()) == "KeyError"
    assert util.one_line(FileNotFoundError(2, "No such file or directory", "/x/y")) == "No such file or directory: /x/y"
    # An error re-raised from a data-loader worker: the last line of its traceback, without the type.
    worker = OSError(
        "Caught OSError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    g()\nOSError: Cannot read 1.png in data: truncated\n'
    )
    assert util.one_line(worker) == "Cannot read 1.png in data: truncated"


def test_checks_of_inputs(tmp_path):
    (tmp_path / "file.pkl").write_bytes(b"")
    util.check_input_file(str(tmp_path / "file.pkl"), "--net")
    util.check_input_file((tmp_path / "file.pkl").as_uri(), "--net")
    util.check_input_file("http://127.0.0.1:9/missing.pkl", "--net")  # URLs are checked when opened
    util.check_input_file(str(tmp_path), "--data", allow_dir=True)
    with pytest.raises(
        FileNotFoundError, match=r'Cannot open network pickle ".*missing.pkl" \(--net\): it does not exist'
    ):
        util.check_input_file(str(tmp_path / "missing.pkl"), "--net", what="network pickle")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        util.check_input_file((tmp_path / "missing.pkl").as_uri(), "--net")
    with pytest.raises(ValueError, match=r"\(--net\): it is a folder, not a file"):
        util.check_input_file(str(tmp_path), "--net")
    util.check_input_dir(str(tmp_path), "--indir")
    with pytest.raises(FileNotFoundError, match=r"\(--indir\): it does not exist"):
        util.check_input_dir(str(tmp_path / "nope"), "--indir")
    with pytest.raises(ValueError, match=r"\(--indir\): it is a file, not a folder"):
        util.check_input_dir(str(tmp_path / "file.pkl"), "--indir")


def test_checks_of_outputs(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    util.check_output_dir(str(tmp_path / "new" / "deeper"), "--outdir")  # can be created
    util.check_output_file(str(tmp_path / "new" / "x.pkl"), "--dest")
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]  # nothing was created
    with pytest.raises(ValueError, match=r'Cannot create output directory ".*file.txt" \(--outdir\): it is a file'):
        util.check_output_dir(str(blocker), "--outdir")
    with pytest.raises(ValueError, match=r'\(--outdir\): ".*file.txt" is a file'):
        util.check_output_dir(str(blocker / "sub"), "--outdir")
    with pytest.raises(ValueError, match=r'Cannot write output file ".*" \(--dest\): it is a folder'):
        util.check_output_file(str(tmp_path), "--dest")
    with pytest.raises(ValueError, match=r'\(--dest\): ".*file.txt" is a file'):
        util.check_output_file(str(blocker / "x.pkl"), "--dest")


def test_check_of_unwritable_folder(tmp_path, monkeypatch):
    (tmp_path / "locked").mkdir()
    real_access = os.access
    # As root every folder is writable, so the permission is denied by a stand-in for os.access.
    monkeypatch.setattr(util.os, "access", lambda path, mode: real_access(path, mode) and "locked" not in str(path))
    with pytest.raises(ValueError, match=r'no permission to write in ".*locked"'):
        util.check_output_dir(str(tmp_path / "locked" / "out"), "--outdir")
    with pytest.raises(ValueError, match=r"\(--dest\): no permission to write"):
        util.check_output_file(str(tmp_path / "locked" / "x.pkl"), "--dest")
    util.check_output_dir(str(tmp_path / "free"), "--outdir")


def test_get_obj_by_name_errors():
    with pytest.raises(ImportError, match="no module named 'no_such_module_xyz'"):
        util.get_obj_by_name("no_such_module_xyz.thing")
    with pytest.raises(ImportError, match="'os.path' has no attribute 'no_such_function'"):
        util.get_obj_by_name("os.path.no_such_function")
    with pytest.raises(TypeError, match="not callable"):
        util.call_func_by_name(func_name="math.pi")


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "0s"),
        (59.4, "59s"),
        (59.6, "1m 00s"),
        (61, "1m 01s"),
        (3599, "59m 59s"),
        (3600, "1h 00m 00s"),
        (3 * 3600 + 4 * 60 + 5, "3h 04m 05s"),
        (86399, "23h 59m 59s"),
        (86400, "1d 00h 00m"),
        (2 * 86400 + 3 * 3600 + 7 * 60 + 59, "2d 03h 07m"),
    ],
)
def test_format_time(seconds, text):
    assert util.format_time(seconds) == text


def test_logger_tees_stdout_and_stderr(tmp_path, capsys):
    log_path = tmp_path / "log.txt"
    log_path.write_text("earlier\n")
    orig_out, orig_err = sys.stdout, sys.stderr
    with util.Logger(str(log_path), file_mode="a"):
        print("to stdout")
        print("to stderr", file=sys.stderr)
    assert sys.stdout is orig_out and sys.stderr is orig_err
    print("after close")
    assert log_path.read_text() == "earlier\nto stdout\nto stderr\n"
    captured = capsys.readouterr()
    assert captured.out == "to stdout\nafter close\n"
    assert captured.err == "to stderr\n"


# ----------------------------------------------------------------------------
# open_url.


def test_is_url():
    assert util.is_url("https://example.com/a.pkl")
    assert util.is_url("http://127.0.0.1:8000/x")
    assert not util.is_url("/tmp/a.pkl")
    assert not util.is_url("file:///tmp/a.pkl")
    assert util.is_url("file:///tmp/a.pkl", allow_file_urls=True)
    assert not util.is_url(123)


def test_open_url_local_path_and_file_url(tmp_path):
    path = tmp_path / "a b.bin"
    path.write_bytes(b"local data")
    with util.open_url(str(path)) as f:
        assert f.read() == b"local data"
    file_url = path.as_uri()  # percent-encodes the space
    with util.open_url(file_url) as f:
        assert f.read() == b"local data"
    assert util.open_url(file_url, return_filename=True) == str(path)
    assert util.open_url(str(path), return_filename=True) == str(path)


def test_open_url_downloads_once_into_cache(http_server, cache_dir):
    data = os.urandom(3000)
    http_server.routes["/models/net?v=1"] = data
    url = http_server.url("/models/net?v=1")
    with util.open_url(url, verbose=False) as f:
        assert f.read() == data
    assert http_server.requests == ["/models/net?v=1"]
    downloads = cache_dir / "downloads"
    assert sorted(os.listdir(downloads)) == [_spec_name(url, url)]
    # Second open: served from the cache, no request.
    with util.open_url(url, verbose=False) as f:
        assert f.read() == data
    assert util.open_url(url, return_filename=True) == str(downloads / _spec_name(url, url))
    assert http_server.requests == ["/models/net?v=1"]
    # cache=False downloads again and leaves the cache alone.
    with util.open_url(url, cache=False, verbose=False) as f:
        assert f.read() == data
    assert len(http_server.requests) == 2
    assert len(os.listdir(downloads)) == 1


def test_open_url_explicit_cache_dir_and_set_cache_dir(http_server, tmp_path):
    http_server.routes["/x.bin"] = b"xyz"
    url = http_server.url("/x.bin")
    target = tmp_path / "explicit"
    assert util.open_url(url, cache_dir=str(target), return_filename=True, verbose=False) == str(
        target / _spec_name(url, url)
    )
    util.set_cache_dir(str(tmp_path / "root"))
    try:
        assert util.make_cache_dir_path("downloads") == str(tmp_path / "root" / "downloads")
        path = util.open_url(url, return_filename=True, verbose=False)
        assert path == str(tmp_path / "root" / "downloads" / _spec_name(url, url))
    finally:
        util.set_cache_dir(None)
    assert len(http_server.requests) == 2


def test_cache_name_uses_content_disposition(http_server, cache_dir):
    long_name = "network snapshot (final)+äö," + "x" * 200 + ".pkl"

    def handler(req):
        body = b"payload"
        req.send_response(200)
        req.send_header("Content-Length", str(len(body)))
        req.send_header(
            "Content-Disposition", 'attachment; filename="' + long_name.encode("utf-8").decode("latin-1") + '"'
        )
        req.end_headers()
        req.wfile.write(body)

    http_server.routes["/download?id=7"] = handler
    url = http_server.url("/download?id=7")
    path = util.open_url(url, return_filename=True, verbose=False)
    # The header arrives as latin-1 text; every non-ASCII char becomes "_".
    header_name = long_name.encode("utf-8").decode("latin-1")
    expected = _spec_name(url, header_name)
    assert os.path.basename(path) == expected
    assert len(expected) == 32 + 1 + 128 and expected.startswith(_md5(url) + "_network_snapshot__final__")
    assert util.cache_file_name(url, 'inline; filename="a/b c.pkl"') == _md5(url) + "_a_b_c.pkl"
    assert util.cache_file_name(url, None) == _spec_name(url, url)


def test_ambiguous_cache_is_not_used(http_server, cache_dir):
    http_server.routes["/f"] = b"fresh"
    url = http_server.url("/f")
    downloads = cache_dir / "downloads"
    downloads.mkdir(parents=True)
    (downloads / (_md5(url) + "_one")).write_bytes(b"stale 1")
    (downloads / (_md5(url) + "_two")).write_bytes(b"stale 2")
    with util.open_url(url, verbose=False) as f:
        assert f.read() == b"fresh"
    assert http_server.requests == ["/f"]


def _truncating_handler(req):
    # Promise 1000 bytes, send 100, then close the connection.
    req.send_response(200)
    req.send_header("Content-Length", "1000")
    req.end_headers()
    req.wfile.write(b"a" * 100)
    req.wfile.flush()
    req.close_connection = True


def test_download_cut_off_leaves_no_cache_entry(http_server, cache_dir):
    http_server.routes["/big.bin"] = _truncating_handler
    url = http_server.url("/big.bin")
    with pytest.raises(OSError) as excinfo:
        util.open_url(url, num_attempts=3, verbose=False)
    message = str(excinfo.value)
    assert url in message and "3 attempts" in message and "\n" not in message
    assert len(http_server.requests) == 3
    downloads = cache_dir / "downloads"
    assert not downloads.exists() or os.listdir(downloads) == []  # no entry, no temporary file
    # Once the server sends everything, the next open downloads the whole file.
    http_server.routes["/big.bin"] = b"b" * 1000
    with util.open_url(url, verbose=False) as f:
        assert f.read() == b"b" * 1000
    assert os.listdir(downloads) == [_spec_name(url, url)]


def test_download_recovers_after_transient_failure(http_server, cache_dir):
    calls = []

    def flaky(req):
        calls.append(1)
        if len(calls) == 1:
            _truncating_handler(req)
        else:
            req.send_response(200)
            req.send_header("Content-Length", "4")
            req.end_headers()
            req.wfile.write(b"good")

    http_server.routes["/flaky"] = flaky
    with util.open_url(http_server.url("/flaky"), num_attempts=2, verbose=False) as f:
        assert f.read() == b"good"
    assert len(http_server.requests) == 2


def test_404_fails_after_configured_retries(http_server, cache_dir, capsys):
    url = http_server.url("/missing.pkl")
    with pytest.raises(OSError) as excinfo:
        util.open_url(url, num_attempts=4, verbose=True)
    message = str(excinfo.value)
    assert re.fullmatch(r"Failed to download \S+ \(4 attempts\): HTTP 404 .*", message), message
    assert url in message
    assert http_server.requests == ["/missing.pkl"] * 4
    assert not (cache_dir / "downloads").exists() or os.listdir(cache_dir / "downloads") == []
    assert "failed" in capsys.readouterr().out


def test_retry_delay_parameter_is_used(http_server, cache_dir):
    import time

    url = http_server.url("/missing")
    start = time.perf_counter()
    with pytest.raises(OSError):
        util.open_url(url, num_attempts=3, verbose=False, retry_delay=0.2)
    assert time.perf_counter() - start >= 0.4  # two waits between three attempts
    assert len(http_server.requests) == 3


def test_large_download_shows_progress_bar(http_server, cache_dir, monkeypatch, capsys):
    monkeypatch.setattr(util, "progress_min_bytes", 1000)
    http_server.routes["/large"] = b"z" * 5000
    with util.open_url(http_server.url("/large"), verbose=True) as f:
        assert f.read() == b"z" * 5000
    captured = capsys.readouterr()
    assert "Downloading" in captured.out and "done" in captured.out
    assert "B/s" in captured.err or "%" in captured.err  # tqdm output
