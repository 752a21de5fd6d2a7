"""One torch thread per test process: the machine's 2 cores are shared with other jobs, and
oversubscribed intra-op threads made small models 10x slower here."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
