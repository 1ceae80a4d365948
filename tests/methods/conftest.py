import torch

# Two cores shared with other work: intra-op threads only add contention for these tiny models.
torch.set_num_threads(1)
