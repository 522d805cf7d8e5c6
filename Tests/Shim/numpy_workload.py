#!/usr/bin/env python3
"""NumPy over arrays much larger than a resident budget: sort, cumulative sums, matrix
products. Prints a digest of every result, so a run under LD_PRELOAD=libfarpage.so can be
compared byte for byte with a plain run.

    numpy_workload.py --mib 256 [--seed 7] [--json NAME]

With --json, prints one JSON object instead: name, seconds, peak RSS and a digest of the
results (for `make bench`).
"""
import argparse
import hashlib
import json
import resource
import sys
import time

import numpy as np


def digest(name, a, out):
    h = hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]
    out.append(f"{name} {a.shape} {a.dtype} {h}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, default=256, help="footprint of the main arrays in MiB")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", metavar="NAME", help="print one JSON line named NAME")
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    n = args.mib * (1 << 20) // 8 // 4  # four float64 arrays of n elements make the footprint
    out = []
    t0 = time.monotonic()

    a = rng.standard_normal(n)
    b = rng.integers(0, 1 << 40, size=n).astype(np.float64)
    digest("a", a, out)
    # Sort: touches every page several times, in an order the prefetcher cannot guess.
    s = np.sort(a, kind="stable")
    digest("sort", s, out)
    del s
    # Cumulative sums: sequential sweeps.
    c = np.cumsum(b)
    digest("cumsum", c, out)
    d = np.cumsum(a[::-1])
    digest("cumsum_reversed", d, out)
    del c, d
    # Elementwise over everything, then a reduction.
    e = a * 3.0 + b
    digest("axpy", e, out)
    out.append(f"sum {float(np.sum(e)):.6e}")
    del e
    # Matrix products over blocks of the big arrays.
    k = int((n // 2) ** 0.5) // 8 * 8
    m1 = a[: k * k].reshape(k, k)
    m2 = b[: k * k].reshape(k, k) / float(1 << 40)
    prod = m1 @ m2
    digest("matmul", prod, out)
    out.append(f"trace {float(np.trace(prod)):.6e}")
    del prod
    # A second pass over the first array: it must be exactly what was written.
    digest("a_again", a, out)
    seconds = time.monotonic() - t0
    if args.json:
        print(json.dumps({
            "name": args.json, "mib": args.mib, "seconds": round(seconds, 3),
            "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "digest": hashlib.sha256("\n".join(out).encode()).hexdigest()[:16],
        }))
    else:
        print("\n".join(out))
    print(f"seconds {seconds:.3f}", file=sys.stderr)


if __name__ == "__main__":
    main()
