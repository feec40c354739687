"""Shared test fixtures.

Tests run on small CPU tensors; on 2-core machines the default thread count makes such work
10-15x slower, so every test process (and every subprocess it starts) uses one thread.
"""

import http.server
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "multiprocess: starts a process group of several processes; EDM2_REPEAT=N runs it N times"
    )


def pytest_generate_tests(metafunc):
    """With EDM2_REPEAT=N, each test marked ``multiprocess`` runs N times (ids ``run1`` ... ``runN``):
    a crash at shutdown shows up only now and then, so one passing run proves little."""
    repeat = int(os.environ.get("EDM2_REPEAT", "1"))
    if repeat > 1 and metafunc.definition.get_closest_marker("multiprocess") is not None:
        metafunc.fixturenames.append("multiprocess_run")
        metafunc.parametrize("multiprocess_run", range(1, repeat + 1), ids=lambda i: f"run{i}")


# What a process that died (an abort, a signal, a fatal interpreter error) leaves in torchrun's output,
# even when it happens after the process did all its work.
_CRASH_SIGNS = re.compile(r"terminate called|Fatal Python error|exitcode\s*:\s*-?[1-9]|ChildFailedError")


def assert_torchrun_succeeded(proc: subprocess.CompletedProcess) -> str:
    """A torchrun job whose processes all exited with status 0, none crashing on its way out;
    returns its output (stdout, then stderr)."""
    output = (proc.stdout or "") + (proc.stderr or "")
    crash = _CRASH_SIGNS.search(output)
    assert proc.returncode == 0 and crash is None, f"exit status {proc.returncode}\n{output[-5000:]}"
    return output


def subprocess_env(**extra: str) -> dict:
    """Environment for a child process: repo on PYTHONPATH, one thread, plus ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env.update(extra)
    return env


class LocalHTTPServer:
    """A file server on 127.0.0.1 that records every request path it receives.

    ``routes`` maps a URL path to bytes (or to a callable handler(request) for special
    behaviour, e.g. a connection cut off midway); other paths are served from ``root``.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.requests: list = []
        self.routes: dict = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                server.requests.append(self.path)
                route = server.routes.get(self.path)
                if callable(route):
                    route(self)
                    return
                if route is not None:
                    data = route
                else:
                    file = server.root / self.path.lstrip("/").split("?")[0]
                    if not file.is_file():
                        self.send_error(404)
                        return
                    data = file.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server(tmp_path):
    """A LocalHTTPServer serving ``tmp_path / 'www'`` (created empty)."""
    root = tmp_path / "www"
    root.mkdir()
    with LocalHTTPServer(root) as server:
        yield server


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private dnnlib cache directory for one test."""
    import dnnlib.util

    path = tmp_path / "dnnlib-cache"
    monkeypatch.setenv("DNNLIB_CACHE_DIR", str(path))
    dnnlib.util.set_cache_dir(None)
    return path


def assert_ok(result) -> None:
    """A click CliRunner result that succeeded (shows the output and exception otherwise)."""
    assert result.exit_code == 0, result.output + repr(result.exception)


def assert_one_line_error(result, *fragments: str) -> str:
    """A click CliRunner result that failed the way bad input should: a non-zero exit, no traceback,
    and exactly one `Error...` line, the last thing on stderr, containing every fragment. Returns it."""
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def single_process_cli(monkeypatch):
    """``invoke(command, *args)``: run a click command in this process as a single, non-torchrun
    process (no retry waits), tearing down any process group it creates."""
    from click.testing import CliRunner

    import dnnlib.util

    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(dnnlib.util, "retry_delay", 0)
    runner = CliRunner()
    yield lambda command, *args: runner.invoke(command, [str(a) for a in args])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
