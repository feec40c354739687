"""Parameters and Gflops per sample of all twelve training presets, against the reference's table.

Each preset's network is built on the meta device (no weights allocated) and counted with
`count_flops`. The script prints one row per preset and exits non-zero if any figure differs from
the table of the reference implementation (params to 0.01 M, Gflops to 0.01).

    python benchmarks/count_flops_presets.py
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import count_flops  # noqa: E402

# (params in M, Gflops per sample) as the reference's count_flops.py reports them.
REFERENCE = {
    "edm2-img512-xxs": (31.31, 11.53),
    "edm2-img512-xs": (124.71, 45.50),
    "edm2-img512-s": (280.21, 101.92),
    "edm2-img512-m": (497.81, 180.79),
    "edm2-img512-l": (777.50, 282.10),
    "edm2-img512-xl": (1119.28, 405.86),
    "edm2-img512-xxl": (1523.16, 552.07),
    "edm2-img64-xs": (124.71, 45.49),
    "edm2-img64-s": (280.21, 101.90),
    "edm2-img64-m": (497.80, 180.77),
    "edm2-img64-l": (777.49, 282.08),
    "edm2-img64-xl": (1119.28, 405.83),
}


def main() -> int:
    header = (
        f"{'preset':<17s}{'params (M)':>12s}{'ref':>10s}{'Gflops':>10s}{'ref':>10s}{'memory (MiB)':>14s}{'sec':>6s}  ok"
    )
    print(header)
    print("-" * len(header))
    failures = 0
    for preset, (ref_params, ref_gflops) in REFERENCE.items():
        start = time.time()
        result = count_flops.count_flops(count_flops.build_preset_network(preset, device="meta"), verbose=False)
        params, gflops = round(result.params / 1e6, 2), round(result.gflops, 2)
        ok = params == ref_params and gflops == ref_gflops and not result.unknown
        failures += not ok
        print(
            f"{preset:<17s}{params:>12.2f}{ref_params:>10.2f}{gflops:>10.2f}{ref_gflops:>10.2f}"
            f"{result.memory_bytes / 2**20:>14.2f}{time.time() - start:>6.1f}  {'yes' if ok else 'NO'}"
        )
    print(f"\n{len(REFERENCE) - failures} of {len(REFERENCE)} presets match the reference's table.")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
