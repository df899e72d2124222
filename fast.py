"""
Speed-ups that leave the model's definitions alone, chosen in one place.

qwen35_mtp.py is the reference: every projection is a plain `nn.Linear`, and the tests check those
definitions against transformers. `speed_up(model)` swaps in faster equivalents where a benchmark
(bench.py) showed that they pay, and test_mtp.py holds each one equal to the plain version.

    from fast import speed_up
    speed_up(model)          # e.g. before decoding; load.py's command line and train.py's demo do this

What it changes:
  - CPU, fp32, a few rows (decoding one token, verifying a few drafts): `FewRowLinear`.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class FewRowLinear(nn.Linear):
    """nn.Linear (no bias) that computes a few fp32 rows on the CPU as W @ x^T.

    This CPU's BLAS runs 2-16 rows 2-4x slower than one, and one row (a GEMV) on a single thread at
    ~19 GB/s, while W @ x^T with two or more columns uses both threads (~30 GB/s once the weight is
    out of cache). So 2-16 rows go through W @ x^T, and a single row of a large weight (>= 1M entries)
    is padded to two columns. Measured on the 0.8B shape: fp32 decoding ~95 instead of ~170 ms/token,
    and verifying k drafts costs about one decode step instead of k. Same result as F.linear up to
    the order of float additions."""

    def forward(self, x):
        rows = x.shape[:-1].numel()
        few = x.dtype == self.weight.dtype == torch.float32 and x.device.type == "cpu" and rows <= 16
        if not few or (rows == 1 and self.weight.numel() < 2 ** 20):
            return F.linear(x, self.weight)
        x2 = x.reshape(rows, -1)
        if rows == 1:
            x2 = x2.repeat(2, 1)                                   # two columns take the threaded path
        return (self.weight @ x2.t())[:, :rows].t().reshape(*x.shape[:-1], -1)


def speed_up(model):
    """Give every bias-free nn.Linear of the model the few-row fp32 CPU path (a no-op elsewhere)."""
    for module in model.modules():
        if type(module) is nn.Linear and module.bias is None:
            module.__class__ = FewRowLinear
    return model
