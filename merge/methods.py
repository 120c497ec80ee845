"""Merging one tensor from several fine-tunes: linear, task arithmetic, TIES and DARE.

Task-vector methods work on τ_i = θ_i − θ_base and return θ_base + λ·merge(τ) (MergeME, TIES-Merging,
DARE). All arithmetic runs in float32 whatever the checkpoints' dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from merge.recipe import MergeMethod

TIES_DEFAULT_SCALE = 1 / 3  # MergeME's λ for TIES/DARE-TIES; it also measured best on the tiny bench


def default_scale(method: MergeMethod, n: int) -> float:
    """λ when the recipe gives none: 1/N where merge(τ) is a sum (a mean), MergeME's 1/3 for TIES means."""
    return TIES_DEFAULT_SCALE if method in {"ties", "dare_ties"} else 1.0 / n


def linear(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    total = sum(weights)
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for t, w in zip(tensors, weights, strict=True):
        out += t.float() * (w / total)
    return out


def trim_threshold(tau: torch.Tensor, density: float) -> float:
    """The |τ| at or above which the `density` share of largest entries lies (TIES' trim step)."""
    if density >= 1.0:
        return 0.0
    k = int(round(density * tau.numel()))
    if k <= 0:
        return float("inf")
    return float(tau.abs().flatten().kthvalue(tau.numel() - k + 1).values)


def kth_smallest_magnitude(
    block: Callable[[int], torch.Tensor],
    blocks: int,
    rank: int,
    map_blocks: Callable[[Callable[[int], torch.Tensor], range], Iterable[torch.Tensor]] = map,
) -> float:
    """The `rank`-th smallest (1-based) of non-negative float32 values given block by block (`block(i)`,
    i < `blocks`, computed twice each), exactly as `kthvalue` on their concatenation, without holding them
    all: non-negative floats order as their int32 bits, so a histogram of the top 16 bits finds the bucket
    holding the answer, and only that bucket's values are kept for the final `kthvalue`. `map_blocks`
    (`map`, or a thread pool's) runs the per-block work; integer counts and one `kthvalue` over the picked
    values make the result the same whatever the order or threads."""

    def histogram(i: int) -> torch.Tensor:
        return torch.bincount(block(i).view(torch.int32) >> 16, minlength=1 << 15)

    counts = torch.zeros(1 << 15, dtype=torch.int64)
    for part in map_blocks(histogram, range(blocks)):
        counts += part
    cumulative = counts.cumsum(0)
    bucket = int(torch.searchsorted(cumulative, rank))
    below = int(cumulative[bucket - 1]) if bucket else 0

    def in_bucket(i: int) -> torch.Tensor:
        values = block(i)
        return values[(values.view(torch.int32) >> 16) == bucket]

    picked = torch.cat(list(map_blocks(in_bucket, range(blocks))))
    return float(picked.kthvalue(rank - below).values)


def trim_by_magnitude(tau: torch.Tensor, density: float, threshold: float | None = None) -> torch.Tensor:
    """Keep the `density` share of entries with the largest |τ| (ties at the threshold are kept).

    `threshold` lets a caller merging a big tensor in row chunks apply the whole tensor's threshold.
    """
    if density >= 1.0:
        return tau
    magnitude = tau.abs()
    if threshold is None:
        k = int(round(density * tau.numel()))
        if k <= 0:
            return torch.zeros_like(tau)
        threshold = float(magnitude.flatten().kthvalue(tau.numel() - k + 1).values)
    return tau * (magnitude >= threshold)


def dare_drop(tau: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability 1 − density and rescale survivors by 1/density (DARE)."""
    if density >= 1.0:
        return tau
    keep = torch.rand(tau.shape, generator=generator) < density
    return tau * keep / density


SEQUENTIAL_SUM_ROWS = 4  # up to this many rows torch's dim-0 sum adds them in order (checked in the tests)


def sign_consensus_mean(taus: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES' elect-and-disjoint-merge: per entry, the weighted mean of the τ_i agreeing with the sign of Σ τ_i."""
    if len(taus) > SEQUENTIAL_SUM_ROWS:
        return _sign_consensus_mean_stacked(taus, weights)
    # The stacked computation below without the stack: the same products, summed in the same order, so
    # the same bits, in half the memory traffic (a factor 1 is skipped: x·1.0 is x).
    # Sums start from +0 as torch's reduction does (it turns a lone −0 into +0).
    scaled = [t if w == 1.0 else t * w for t, w in zip(taus, weights, strict=True)]
    total = torch.zeros_like(scaled[0])
    for t in scaled:
        total.add_(t)
    numerator = torch.zeros_like(total)
    denominator = torch.zeros_like(total)
    for t, w in zip(scaled, weights, strict=True):
        agree = (t * total) > 0
        numerator.add_(t * agree)
        denominator.add_(agree.float() if w == 1.0 else w * agree)
    return numerator.div_(denominator.clamp_min_(1e-12))


def _sign_consensus_mean_stacked(taus: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    stacked = torch.stack([t * w for t, w in zip(taus, weights, strict=True)])
    total = stacked.sum(dim=0)
    agree = (stacked * total) > 0  # same sign as the elected one, and neither is zero
    weight_grid = torch.tensor(weights, dtype=torch.float32).view(-1, *([1] * taus[0].dim()))
    numerator = (stacked * agree).sum(dim=0)
    denominator = (weight_grid * agree).sum(dim=0)
    return numerator / denominator.clamp_min(1e-12)  # 0 where nobody agrees: numerator is 0 there


def merge_tensor(
    method: MergeMethod,
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    scale: float | None,
    density: float,
    generator: torch.Generator | None = None,
    trim_thresholds: list[float] | None = None,
) -> torch.Tensor:
    """Merge one named tensor (or a row chunk of it, with the whole tensor's trim thresholds); float32."""
    if method == "linear":
        return linear(tensors, weights)
    if base is None:
        raise ValueError(f"method {method} needs the base tensor")
    base32 = base.float()
    taus = [t.float() - base32 for t in tensors]
    return merge_task_vectors(
        method,
        taus,
        weights,
        base32,
        scale=scale,
        density=density,
        generator=generator,
        trim_thresholds=trim_thresholds,
    )


def merge_task_vectors(
    method: MergeMethod,
    taus: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor,
    *,
    scale: float | None,
    density: float,
    generator: torch.Generator | None = None,
    trim_thresholds: list[float] | None = None,
) -> torch.Tensor:
    """θ_base + λ·merge(τ) from the task vectors themselves (a LoRA's is s·B·A, never a difference); float32."""
    base32 = base.float()
    lam = default_scale(method, len(taus)) if scale is None else scale
    if method == "task_arithmetic":
        merged = sum(t * w for t, w in zip(taus, weights, strict=True))
    elif method == "ties":
        cuts: list[float | None] = list(trim_thresholds) if trim_thresholds else [None] * len(taus)
        merged = sign_consensus_mean(
            [trim_by_magnitude(t, density, c) for t, c in zip(taus, cuts, strict=True)], weights
        )
    elif method in {"dare_linear", "dare_ties"}:
        if generator is None:
            raise ValueError(f"method {method} needs a seeded generator")
        dropped = [dare_drop(t, density, generator) for t in taus]
        if method == "dare_linear":
            merged = sum(t * w for t, w in zip(dropped, weights, strict=True))
        else:
            merged = sign_consensus_mean(dropped, weights)
    else:  # pragma: no cover - the recipe's Literal keeps this unreachable
        raise ValueError(f"unknown merge method {method!r}")
    return base32 + lam * merged
