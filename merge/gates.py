"""Gate initialisers: one router matrix per layer, from calibration hidden states or from the weights alone.

Each returns W of shape [num_experts, hidden] for one layer, such that `x @ W.T` are router logits.
`labels[n]` is the expert index of token n, or −(i+1) for a token of expert i's negative prompts.
`arrow` needs no data: each expert's row is the input direction its FFN changed most (Arrow, Ostapenko
et al. 2024, as PEFT's `tuners/lora/arrow.py` routes LoRA experts).
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


ARROW_BLOCK = (
    16  # subspace width of the top-singular-vector iteration: a block converges fast on flat spectra
)
ARROW_MAX_ITERATIONS = 32
ARROW_CHECK_EVERY = 4  # iterations between convergence checks (each costs about one iteration)
ARROW_TOLERANCE = 1e-7  # stop once 1 − |cos| between two checks' vectors is below this


def arrow_prototype(deltas: list[torch.Tensor], *, seed: int = 0) -> torch.Tensor:
    """The top right singular vector of the FFN-input deltas stacked by rows ([Σ out, hidden] → [hidden]).

    The FFN's input projections (gate_proj and up_proj) both read the same x, so the direction of x that
    the expert's change amplifies most is the top right singular vector of [Δgate; Δup]. Found by a seeded
    block power iteration with Rayleigh-Ritz (a truncated SVD: never the hidden × hidden Gram matrix), run
    until the vector stops moving; then the sign is fixed so the largest-magnitude entry is positive: a
    singular vector is defined up to sign, Arrow's |<x, v>| does not care, but a written checkpoint should
    not depend on the iteration's start. A zero delta (an expert that kept the base's FFN here) gives the
    zero vector: logit 0, no preference.
    """
    delta = torch.cat([d.float() for d in deltas], dim=0)
    hidden = delta.shape[1]
    if not bool(delta.any()):
        return torch.zeros(hidden)
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(hidden, min(ARROW_BLOCK, hidden), generator=generator))
    v = torch.zeros(hidden)
    for step in range(1, ARROW_MAX_ITERATIONS + 1):
        projected = delta @ q  # [Σ out, block]
        if step % ARROW_CHECK_EVERY == 0 or step == ARROW_MAX_ITERATIONS:
            _, _, vh = torch.linalg.svd(projected, full_matrices=False)
            top = q @ vh[0]
            converged = 1 - abs(float(top @ v)) < ARROW_TOLERANCE
            v = top
            if converged:
                break
        q, _ = torch.linalg.qr((projected.T @ delta).T)  # (ΔᵀΔ) q, without a transposed Δ product
    v = v / v.norm().clamp_min(1e-12)
    return v if v[v.abs().argmax()] >= 0 else -v


def arrow_gate(prototypes: torch.Tensor, temperature: float, mirror: bool) -> torch.Tensor:
    """Gate rows v_i / T; mirrored: [+v; −v], whose linear top-k (and renormalised softmax) over 2N rows is
    exactly Arrow's top-k of |<x, v_i>| / T over N experts (one of ±<x, v_i> is |<x, v_i>|, the other ≤ 0)."""
    rows = prototypes / temperature
    return torch.cat([rows, -rows]) if mirror else rows


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
    if kind == "arrow":
        raise ValueError("gate.init=arrow is built from the experts' weights: use arrow_prototype/arrow_gate")
    raise ValueError(f"unknown gate init {kind!r}")
