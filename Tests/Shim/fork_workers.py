#!/usr/bin/env python3
"""Python multiprocessing with the fork start method over a far NumPy array: the workers
(forked children, no exec) read slices of the parent's array and write to their own copy;
the parent checks their sums against its own and that its array did not change.
Prints "ok" and exits 0, or says what differed and exits 1."""
import multiprocessing as mp
import sys

import numpy as np

data = None


def work(i):
    n = len(data)
    lo, hi = i * n // 8, (i + 1) * n // 8
    s = float(np.sum(data[lo:hi]))
    data[lo:hi] = -1.0  # the child's copy only
    return s


def main():
    global data
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    rng = np.random.default_rng(3)
    data = rng.standard_normal(mib * (1 << 20) // 8)
    expected = [float(np.sum(data[i * len(data) // 8:(i + 1) * len(data) // 8])) for i in range(8)]
    before = data.copy()
    ctx = mp.get_context("fork")
    # close() + join(), not the with-block's terminate(): terminate() racing the pool's
    # worker handler can start a replacement worker that then waits forever on the task
    # queue's lock (a CPython Pool race, more likely the slower fork is).
    pool = ctx.Pool(2)
    try:
        got = pool.map(work, range(8))
    finally:
        pool.close()
        pool.join()
    if got != expected:
        print(f"workers' sums differ: {got} vs {expected}")
        return 1
    if not np.array_equal(data, before):
        print("the parent's array changed after its children wrote their copies")
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
