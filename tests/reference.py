"""An obviously correct, slow implementation of the layer, written from the formula alone (no batchless code)."""

import torch


def naive_std(raw, std_param, eps, gain):
    s = gain * raw
    return {"log": lambda: torch.exp(s), "abs": lambda: torch.abs(s) + eps,
            "inv": lambda: 1.0 / (torch.abs(s) + eps)}[std_param]()


def naive_forward(x, raw_mean, raw, weight, bias, std_param, eps, gain, mean_gain=1.0):
    """Returns (y, gauged nll) with the method's stop-gradients, elementwise, channel dim 1; sigma is
    ``std_param``'s function of ``gain * raw``, mu is ``mean_gain * raw_mean``."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    sigma = naive_std(raw, std_param, eps, gain).expand(x.shape[1]).reshape(shape)
    mu = (mean_gain * raw_mean).expand(x.shape[1]).reshape(shape)
    y = (x - mu.detach()) / sigma.detach()
    if weight is not None:
        y = y * weight.reshape(shape) + bias.reshape(shape)
    per_element = torch.log(sigma) + 0.5 * ((x.detach() - mu) / sigma) ** 2
    per_element = per_element.expand_as(x)
    gauge = (torch.log(sigma).mean() + 0.5).detach()
    return y, per_element.mean() - gauge
