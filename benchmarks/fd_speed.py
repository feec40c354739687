"""Speed and accuracy of calculate_metrics.calculate_fd against the reference formula.

The reference computes the Fréchet distance with ``scipy.linalg.sqrtm(sigma1 @ sigma2)``;
``calculate_fd`` uses a Cholesky factor and a symmetric eigenvalue solve instead. For each case the
script times both (best of ``--repeats`` for ours, one run of the reference by default) on
covariances of correlated, non-negative, heavy-tailed synthetic features (like pooled CNN
features), and prints a markdown table with the relative differences and the speed-up.
Rank-deficient cases use fewer samples than dimensions; for them the exact value is also
computed from the features (sqrtm itself is off there by the square roots of rounding noise).

    python benchmarks/fd_speed.py --threads 1           # 2048-d, the default cases, one BLAS thread
    python benchmarks/fd_speed.py --threads 1 --check   # exit 1 unless every case agrees and is >= 10x faster
    python benchmarks/fd_speed.py --dim 1024            # other sizes; the library's default thread count

``--threads`` sets OMP/MKL/OpenBLAS thread counts before numpy, scipy and torch load. On small
shared machines several BLAS threads per process can be much slower than one (the symmetric
eigenvalue solve is memory-bound and its threads wait on each other), so compare like with like.
"""

import argparse
import os
import sys
import time
import warnings


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension (default 2048)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of calculate_fd (best is shown)")
    parser.add_argument("--ref-repeats", type=int, default=1, help="timed runs of the sqrtm reference")
    parser.add_argument("--threads", type=int, default=None, help="BLAS/LAPACK threads (default: as configured)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 unless every case agrees (1e-6 vs sqrtm, or exact) and is >= 10x faster",
    )
    return parser.parse_args()


args = parse_args()
if args.threads is not None:  # must happen before the numerical libraries load
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from calculate_metrics import calculate_fd  # noqa: E402


def reference_fd(mu1, sigma1, mu2, sigma2):
    """The reference implementation's formula (for comparison only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm's `disp` deprecation and singular-matrix warnings
        s, _ = scipy.linalg.sqrtm(np.dot(sigma1, sigma2), disp=False)
    return float(np.real(np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - s * 2)))


def synthetic_features(num_samples, dim, seed, shift=0.0):
    """ReLU'd correlated Gaussian features with a power-law spectrum."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(12345).standard_normal((dim, dim)) * (np.arange(1, dim + 1) ** -0.7)[:, None]
    return np.maximum(rng.standard_normal((num_samples, dim)) @ mixing + shift, 0)


def exact_fd(x1, x2):
    """FD from the features: tr (sigma1 sigma2)^(1/2) is the nuclear norm of A1 A2^T, where
    sigma_i = A_i^T A_i (cheap when a set has fewer samples than dimensions)."""
    mu1, mu2 = x1.mean(0), x2.mean(0)
    a1, a2 = (x1 - mu1) / np.sqrt(len(x1) - 1), (x2 - mu2) / np.sqrt(len(x2) - 1)
    return float(
        np.square(mu1 - mu2).sum()
        + np.square(a1).sum()
        + np.square(a2).sum()
        - 2 * scipy.linalg.svdvals(a1 @ a2.T).sum()
    )


def best_time(fn, args, repeats):
    times, value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times), value


def main():
    d = args.dim
    calculate_fd(np.zeros(2), np.eye(2), np.ones(2), np.eye(2))  # warm up: lazy BLAS/LAPACK initialisation
    cases = [  # (name, samples of set 1, samples of set 2, shift of set 2)
        ("full rank, similar", 2 * d, 2 * d, 0.05),
        ("full rank, different", 2 * d, 2 * d, 0.5),
        ("rank-deficient (N1 < d)", d // 2, 2 * d, 0.05),
        ("rank-deficient (both < d)", d // 4, d // 2, 0.05),
    ]
    import torch

    print(
        f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"torch threads={torch.get_num_threads()}, cpus={os.cpu_count()}, load={os.getloadavg()[0]:.1f}"
    )
    print()
    print(
        f"| case ({d}-d) | FD (sqrtm) | FD (ours) | ours vs sqrtm | sqrtm vs exact | ours vs exact "
        f"| sqrtm [s] | ours [s] | speed-up |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    ok = True
    for i, (name, n1, n2, shift) in enumerate(cases):
        x1 = synthetic_features(n1, d, seed=2 * i)
        x2 = synthetic_features(n2, d, seed=2 * i + 1, shift=shift)
        stats = (x1.mean(0), np.cov(x1, rowvar=False), x2.mean(0), np.cov(x2, rowvar=False))
        t_ref, fd_ref = best_time(reference_fd, stats, args.ref_repeats)
        t_ours, fd_ours = best_time(calculate_fd, stats, args.repeats)
        rel = abs(fd_ours - fd_ref) / abs(fd_ref)
        speedup = t_ref / t_ours
        # The exact value (from the features) is cheap only for sets with fewer samples than dimensions.
        exact = exact_fd(x1, x2) if min(n1, n2) < d else None
        ref_err = "—" if exact is None else f"{abs(fd_ref - exact) / exact:.1e}"
        our_err = "—" if exact is None else f"{abs(fd_ours - exact) / exact:.1e}"
        # Agreement: within 1e-6 of sqrtm, or exact where sqrtm's own rounding error is larger.
        agrees = rel <= 1e-6 or (exact is not None and abs(fd_ours - exact) <= 1e-9 * exact)
        ok = ok and agrees and speedup >= 10
        print(
            f"| {name} | {fd_ref:.6f} | {fd_ours:.6f} | {rel:.1e} | {ref_err} | {our_err} "
            f"| {t_ref:.2f} | {t_ours:.3f} | {speedup:.1f}x |",
            flush=True,
        )
    if args.check and not ok:
        print("FAILED: a result neither within 1e-6 of sqrtm nor exact, or a speed-up below 10x")
        sys.exit(1)


if __name__ == "__main__":
    main()
