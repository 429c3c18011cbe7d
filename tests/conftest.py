import torch

# CI has 2 cores; tiny tensors gain nothing from intra-op threads, and OpenMP regions on a loaded
# machine cost milliseconds each.
torch.set_num_threads(1)
