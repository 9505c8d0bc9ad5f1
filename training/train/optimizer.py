"""AdamW with weight decay on matrices only, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from training.train.config import OptimSection


def param_groups(
    model: nn.Module, weight_decay: float, lr: float, pruning_lr_scale: float = 1.0
) -> list[dict[str, object]]:
    """Matrices (dim >= 2: projections, the tied embedding) decay; norm weights do not. The
    pruning parameters (``.pruner.``), when there are any, form their own group at lr x
    ``pruning_lr_scale`` and without decay (decay would pull the gates towards pruning)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    pruning: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".pruner." in name:
            pruning.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups: list[dict[str, object]] = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
    ]
    if pruning:  # models without gates keep exactly the groups they had
        groups.append({"params": pruning, "weight_decay": 0.0, "lr": lr * pruning_lr_scale})
    return groups


def lr_factor(step: int, cfg: OptimSection) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warmup, then cosine to min ratio."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module, cfg: OptimSection, pruning_lr_scale: float = 1.0
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    # A client torch optimizer: no DeepSpeed op compilation (STACK.md), same maths everywhere.
    opt = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, cfg.lr, pruning_lr_scale),
        lr=cfg.lr,
        betas=cfg.betas,
        eps=1e-8,
        foreach=False,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    return opt, sched
