"""Model tests run on one torch thread.

The models here are tiny: with two OpenMP threads on a shared 2-core machine
every small op spin-waits for a descheduled partner (building a tiny Prob.
U-Net: 3.3 s with 2 threads, 0.03 s with 1, measured).
"""

from __future__ import annotations

import torch

torch.set_num_threads(1)
