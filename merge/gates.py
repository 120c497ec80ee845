"""Gate initialisers: from the FFN-input hidden states of each expert's prompts to one router matrix.

Each returns W of shape [num_experts, hidden] for one layer, such that `x @ W.T` are router logits.
`labels[n]` is the expert index of token n, or −(i+1) for a token of expert i's negative prompts.
"""

from __future__ import annotations

import torch

from merge.recipe import GateInit

LOGIT_STD = 4.0  # spread of initial router logits over calibration tokens: confident, not saturated


def _calibrate_scale(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    logits = x @ w.T
    spread = (logits - logits.mean(dim=1, keepdim=True)).std()
    return w * (LOGIT_STD / spread) if spread > 0 else w


def prototype_gate(x: torch.Tensor, labels: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Contrastive mean directions: expert i's mean state minus the others' (and its negatives'), unit norm."""
    has_data = [bool((labels == i).any()) for i in range(num_experts)]
    means = torch.stack(
        [x[labels == i].mean(dim=0) if has_data[i] else torch.zeros(x.shape[1]) for i in range(num_experts)]
    )
    rows = []
    for i in range(num_experts):
        if not has_data[i]:  # e.g. the base joining as an expert: logit 0, the pick when nobody is confident
            rows.append(torch.zeros(x.shape[1]))
            continue
        others = [means[j] for j in range(num_experts) if j != i and has_data[j]]
        contrast = torch.stack(others).mean(dim=0) if others else torch.zeros_like(means[i])
        negatives = x[labels == -(i + 1)]
        if len(negatives):
            contrast = (contrast + negatives.mean(dim=0)) / 2 if others else negatives.mean(dim=0)
        direction = means[i] - contrast
        rows.append(direction / direction.norm().clamp_min(1e-8))
    return _calibrate_scale(torch.stack(rows), x[labels >= 0])


def ridge_gate(x: torch.Tensor, labels: torch.Tensor, num_experts: int, lam: float) -> torch.Tensor:
    """Closed-form ridge regression from states to one-hot expert labels, each expert's tokens weighted equally."""
    targets = torch.zeros(len(x), num_experts)
    positive = labels >= 0
    targets[positive, labels[positive]] = 1.0
    negative = ~positive
    if negative.any() and num_experts > 1:
        owner = -labels[negative] - 1
        rows = torch.full((int(negative.sum()), num_experts), 1.0 / (num_experts - 1))
        rows[torch.arange(len(owner)), owner] = 0.0
        targets[negative] = rows
    group = torch.where(positive, labels, num_experts + (-labels - 1))
    counts = torch.bincount(group, minlength=2 * num_experts).float()
    weights = (1.0 / counts[group]).unsqueeze(1)
    gram = x.T @ (x * weights)
    reg = lam * gram.diagonal().mean() * torch.eye(x.shape[1])
    w = torch.linalg.solve(gram + reg, x.T @ (targets * weights)).T
    return _calibrate_scale(w, x[positive])


def init_gate(
    kind: GateInit,
    x: torch.Tensor,
    labels: torch.Tensor,
    num_experts: int,
    *,
    ridge_lambda: float,
    generator: torch.Generator,
) -> torch.Tensor:
    hidden = x.shape[1]
    if kind == "uniform":
        return torch.zeros(num_experts, hidden)
    if kind == "random":
        return torch.randn(num_experts, hidden, generator=generator) * 0.02
    if kind in {"hidden", "cheap_embed"}:
        return prototype_gate(x, labels, num_experts)
    if kind == "ridge":
        return ridge_gate(x, labels, num_experts, ridge_lambda)
    raise ValueError(f"unknown gate init {kind!r}")
