"""``token_dots`` and ``column_dots`` against ``torch.bmm(x, v)``: every token times one vector per batch row.

Run: ``python benchmarks/token_dots.py [--shapes 1x576,1x4608,1x18432,16x576] [--dim 1024] [--repeats 20]``

Every greedy selection (DivPrune's picks, the QR basis, CDPruner's DPP) makes one such product per
step, a pass over all tokens that is bound by how fast the BLAS reads them. For each ``B x N``, the
ways are timed in the same run on the same float32 tokens (fastest of ``--repeats`` calls), with the
read bandwidth each reaches and the ratio to ``bmm``: ``token_dots`` on the rows and ``column_dots`` on
a transposed copy (CDPruner's layout; four pieces for one batch row).
"""

from __future__ import annotations

import argparse

import torch

from tokencomp.analysis.measure import time_ms
from tokencomp.kernels import column_dots, column_pieces, padded_columns, padded_rows, token_dots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1x576,1x4608,1x18432,16x576", help="B x N pairs (comma list)")
    parser.add_argument("--dim", type=int, default=1024, help="channels D")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per figure")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    print(f"{torch.get_num_threads()} threads, D = {args.dim}, float32")
    for shape in args.shapes.split(","):
        b, n = (int(v) for v in shape.split("x"))
        x = torch.zeros(b, padded_rows(n), args.dim)
        x[:, :n] = torch.randn(b, n, args.dim, generator=g)
        v = torch.randn(b, args.dim, generator=g)
        out = torch.empty(b, x.shape[1])
        rows = x[:, :n]  # the same tokens, unpadded, for bmm
        col = torch.empty(b, n, 1)
        plain = time_ms(lambda rows=rows, v=v, col=col: torch.bmm(rows, v.unsqueeze(-1), out=col), args.repeats)
        ours = time_ms(lambda x=x, v=v, out=out: token_dots(x, v, out), args.repeats)
        gb = b * n * args.dim * 4 / 1e6  # GB read, over ms
        line = (
            f"B={b:>2} N={n:>6}: bmm(x, v) {plain:8.3f} ms ({gb / plain:5.1f} GB/s)   "
            f"token_dots {ours:8.3f} ms ({gb / ours:5.1f} GB/s, {ours / plain:.2f}x)"
        )
        pieces = column_pieces(b, x.device)
        cols = torch.zeros(b, args.dim, padded_columns(n, pieces))
        cols[:, :, :n] = rows.transpose(1, 2)
        cout = torch.empty(b, cols.shape[2])
        col = time_ms(lambda cols=cols, v=v, pieces=pieces, cout=cout: column_dots(cols, v, pieces, cout), args.repeats)
        line += f"   column_dots {col:8.3f} ms ({gb / col:5.1f} GB/s, {col / plain:.2f}x)"
        print(line)


if __name__ == "__main__":
    main()
