from __future__ import annotations

import torch

# Two cores shared with other work: intra-op threads only add contention for these small tensors.
torch.set_num_threads(1)
