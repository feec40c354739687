"""Speed and accuracy of calculate_metrics.calculate_fd against the reference formula.

The reference computes the Fréchet distance with ``scipy.linalg.sqrtm(sigma1 @ sigma2)``;
``calculate_fd`` uses a Cholesky factor and a symmetric eigenvalue solve instead. For each case the
script times both (best of ``--repeats`` for ours, one run of the reference by default) on
covariances of correlated, non-negative, heavy-tailed synthetic features (like pooled CNN
features), and prints a markdown table with the relative difference and the speed-up.
Rank-deficient cases use fewer samples than dimensions.

    python benchmarks/fd_speed.py                       # 2048-d, the default cases
    python benchmarks/fd_speed.py --dim 1024 --check    # exit 1 unless rel. diff <= 1e-6 and speed-up >= 10
"""

import argparse
import os
import sys
import time
import warnings

import numpy as np
import scipy.linalg

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from calculate_metrics import calculate_fd  # noqa: E402


def reference_fd(mu1, sigma1, mu2, sigma2):
    """The reference implementation's formula (for comparison only)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # sqrtm's `disp` deprecation and singular-matrix warnings
        s, _ = scipy.linalg.sqrtm(np.dot(sigma1, sigma2), disp=False)
    return float(np.real(np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - s * 2)))


def synthetic_stats(num_samples, dim, seed, shift=0.0):
    """mu, sigma of ReLU'd correlated Gaussian features with a power-law spectrum."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(12345).standard_normal((dim, dim)) * (np.arange(1, dim + 1) ** -0.7)[:, None]
    features = np.maximum(rng.standard_normal((num_samples, dim)) @ mixing + shift, 0)
    return features.mean(0), np.cov(features, rowvar=False)


def best_time(fn, args, repeats):
    times, value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times), value


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--dim', type=int, default=2048, help='feature dimension (default 2048)')
    parser.add_argument('--repeats', type=int, default=3, help='timed runs of calculate_fd (best is shown)')
    parser.add_argument('--ref-repeats', type=int, default=1, help='timed runs of the sqrtm reference')
    parser.add_argument('--check', action='store_true', help='exit 1 unless every case agrees to 1e-6 and is >= 10x faster')
    args = parser.parse_args()

    d = args.dim
    cases = [  # (name, samples of set 1, samples of set 2, shift of set 2)
        ('full rank, similar', 2 * d, 2 * d, 0.05),
        ('full rank, different', 2 * d, 2 * d, 0.5),
        ('rank-deficient (N1 < d)', d // 2, 2 * d, 0.05),
        ('rank-deficient (both < d)', d // 4, d // 2, 0.05),
    ]
    print(f'threads: OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS", "unset")}, cpus={os.cpu_count()}')
    print()
    print(f'| case ({d}-d) | FD (sqrtm) | FD (ours) | rel. diff | sqrtm [s] | ours [s] | speed-up |')
    print('| --- | ---: | ---: | ---: | ---: | ---: | ---: |')
    ok = True
    for i, (name, n1, n2, shift) in enumerate(cases):
        mu1, sigma1 = synthetic_stats(n1, d, seed=2 * i)
        mu2, sigma2 = synthetic_stats(n2, d, seed=2 * i + 1, shift=shift)
        stats = (mu1, sigma1, mu2, sigma2)
        t_ref, fd_ref = best_time(reference_fd, stats, args.ref_repeats)
        t_ours, fd_ours = best_time(calculate_fd, stats, args.repeats)
        rel = abs(fd_ours - fd_ref) / abs(fd_ref)
        speedup = t_ref / t_ours
        ok = ok and rel <= 1e-6 and speedup >= 10
        print(f'| {name} | {fd_ref:.6f} | {fd_ours:.6f} | {rel:.1e} | {t_ref:.2f} | {t_ours:.3f} | {speedup:.1f}x |',
              flush=True)
    if args.check and not ok:
        print('FAILED: relative difference above 1e-6 or speed-up below 10x')
        sys.exit(1)


if __name__ == '__main__':
    main()
