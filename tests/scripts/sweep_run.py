"""Runs ``calculate_metrics.py`` (e.g. ``sweep``) with the small test detectors, for tests/test_sweep.py.

``fid`` is ``PoolDetector`` and ``fd_dinov2`` a seeded ``ConvDetector``. Two hooks, by environment:
``SWEEP_COUNT_FILE`` gets one line per evaluated combination (to count the computations), and after
``SWEEP_KILL_AFTER`` results have been appended, the process kills itself with SIGKILL (no cleanup,
as when a machine is lost). ``SWEEP_ARGV`` (a JSON list), if set, replaces the command-line arguments.
"""

import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import calculate_metrics  # noqa: E402
from tests.scripts import metrics_detectors  # noqa: E402
from training import sweep  # noqa: E402


def install_hooks() -> None:
    count_file, kill_after = os.environ.get("SWEEP_COUNT_FILE"), os.environ.get("SWEEP_KILL_AFTER")
    evaluate, append = sweep.evaluate_point, sweep.append_json_line
    appended = []

    def counting_evaluate(*args, **kwargs):
        if count_file:
            with open(count_file, "a") as f:
                f.write(f"{os.environ.get('RANK', '0')}\n")
        return evaluate(*args, **kwargs)

    def killing_append(*args, **kwargs):
        append(*args, **kwargs)
        appended.append(1)
        if kill_after is not None and len(appended) >= int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)

    sweep.evaluate_point, sweep.append_json_line = counting_evaluate, killing_append


if __name__ == "__main__":
    calculate_metrics.register_detector("fid", metrics_detectors.PoolDetector())
    calculate_metrics.register_detector("fd_dinov2", metrics_detectors.ConvDetector(seed=2))
    install_hooks()
    argv = json.loads(os.environ["SWEEP_ARGV"]) if "SWEEP_ARGV" in os.environ else sys.argv[1:]
    calculate_metrics.cmdline(argv)
