"""ApET with the QR basis against LAPACK's pivoted QR, with PyTorch on one thread and on two.

Run: ``python benchmarks/apet_qr_threads.py [--threads 1,2] [--repeats 200]``

``tokencomp bench`` times ApET-QR (one 576 x 1024 image, 64 kept) against ``scipy.linalg.qr(X^T,
pivoting=True, mode="r")`` with PyTorch's default thread count. Most of ApET-QR's time beyond its
arithmetic is small operator calls and, between them, the wake-ups of PyTorch's other threads; this
script shows how much by timing the same call with ``torch.set_num_threads(t)`` for each ``t``, LAPACK
(scipy's BLAS, its own threads) beside each, in one run. Fastest of ``--repeats`` calls (LAPACK: of 20,
about as long in all).
"""

from __future__ import annotations

import argparse

import scipy.linalg
import torch

import tokencomp as tc
from tokencomp.analysis.bench import BenchShape, bench_tokens, time_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="PyTorch thread counts to time (comma list)")
    parser.add_argument("--repeats", type=int, default=200, help="timed ApET-QR calls per figure")
    args = parser.parse_args()
    x = bench_tokens(BenchShape(1, 576, 1024, 64), torch.float32, torch.device("cpu"))
    apet = tc.create("apet", basis="qr")
    tokens = x[0].numpy().T
    default = torch.get_num_threads()
    try:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            ours = time_ms(lambda: apet.compress(x, 64), args.repeats)
            lapack = time_ms(lambda: scipy.linalg.qr(tokens, pivoting=True, mode="r"), 20)
            print(
                f"torch threads {threads}: ApET-QR {ours:.2f} ms, LAPACK mode='r' {lapack:.2f} ms, "
                f"ratio {ours / lapack:.3f}",
                flush=True,
            )
    finally:
        torch.set_num_threads(default)


if __name__ == "__main__":
    main()
