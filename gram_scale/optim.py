"""Optimizers of the encoder and the CF model, built from the options in one place."""

from __future__ import annotations

import torch


def make_optimizer(params, opts, lr: float) -> torch.optim.Optimizer:
    """AdamW (the default) or plain SGD without momentum (``--optimizer sgd``).

    Plain SGD moves a parameter by exactly lr * gradient, so float rounding in the gradient
    stays rounding in the parameter; Adam divides by the gradient's own size and can turn
    rounding noise on a near-zero coordinate into a full step."""
    if opts.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=opts.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=opts.weight_decay)
