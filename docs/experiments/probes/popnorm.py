"""Probe: normalization by the producer's input moments (a population, batch-free BatchNorm). For each conv or
linear layer feeding a batchless layer, the pair is replaced by one block that keeps running estimates of the
producer's input patch mean m and covariance S (EMA over steps, decay D, set from the data init) and normalizes the
producer's output h = W a + b by mean W m + b and std sqrt(w^T S w) per channel, with the gradient flowing through
both to W and b: the population version of the projection BatchNorm's backward applies (`bnback.py`), batch-free
(a step's output uses the estimates of the steps before it). The input's own norm stays the library's layer.

Usage: popnorm.py BS LR SEED [decay=D] (no WS: the blocks leave no producer feeding a norm layer). Prints one JSON
record (test accuracy at 25/50/75/100 % of the run, the final model's eval-mode loss and accuracy on the training,
validation and test sets)."""
import json
import sys

import torch
import torch.nn.functional as F
from final_fit import run
from torch import nn

import batchless as bl
from batchless_experiments import data

torch.set_num_threads(1)
bs, lr, seed = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
decay = next((float(a.split("=")[1]) for a in sys.argv[4:] if a.startswith("decay=")), 0.9)


class PopBlock(nn.Module):
    def __init__(self, producer: nn.Module, channels: int):
        super().__init__()
        self.producer = producer
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.m = self.s = None

    def patches(self, x):
        if x.dim() == 2:
            return x
        k = self.producer.kernel_size[0]
        xp = F.pad(x, (k // 2, k // 2))
        return xp.unfold(2, k, 1).permute(0, 2, 1, 3).reshape(-1, x.shape[1] * k)

    def forward(self, x):
        h = self.producer(x)
        p = self.patches(x.detach())
        m_b = p.mean(0)
        s_b = (p - m_b).T @ (p - m_b) / len(p)
        if self.m is None:  # the data init's forward (eval mode) sets them
            self.m, self.s = m_b, s_b
        w = self.producer.weight.flatten(1)
        mean = w @ self.m + self.producer.bias
        std = torch.sqrt(torch.einsum("ji,ik,jk->j", w, self.s, w) + 1e-5)
        shape = (1, -1) + (1,) * (h.dim() - 2)
        y = (h - mean.view(shape)) / std.view(shape) * self.weight.view(shape) + self.bias.view(shape)
        if self.training:
            self.m = decay * self.m + (1 - decay) * m_b
            self.s = decay * self.s + (1 - decay) * s_b
        return y


def replace_pairs(model):
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        kids = list(seq.children())
        for i in range(len(kids) - 1):
            if isinstance(kids[i], (nn.Conv1d, nn.Linear)) and isinstance(kids[i + 1], bl.BatchlessNorm1d):
                seq[i] = PopBlock(kids[i], kids[i + 1].num_features)
                seq[i + 1] = nn.Identity()


result = run(data.load("mnist1d"), "default", bs, lr, seed, prepare=replace_pairs)
print(json.dumps({"probe": "popnorm", "decay": decay, "ws": False, "bs": bs, "lr": lr, "seed": seed, **result}))
