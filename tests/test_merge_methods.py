"""Merge methods on small tensors against values computed by hand."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from merge.methods import dare_drop, merge_tensor, sign_consensus_mean, trim_by_magnitude

BASE = torch.tensor([10.0, 10.0, 10.0, 10.0])
T1 = BASE + torch.tensor([1.0, -2.0, 3.0, 0.5])
T2 = BASE + torch.tensor([-1.0, -1.0, 2.0, 4.0])


def test_linear_is_weighted_mean() -> None:
    out = merge_tensor(
        "linear", [torch.tensor([0.0, 4.0]), torch.tensor([4.0, 0.0])], [1, 3], None, scale=None, density=1.0
    )
    assert torch.equal(out, torch.tensor([3.0, 1.0]))


def test_task_arithmetic_adds_scaled_task_vectors() -> None:
    base = torch.tensor([1.0, 1.0])
    out = merge_tensor(
        "task_arithmetic",
        [torch.tensor([2.0, 0.0]), torch.tensor([1.0, 3.0])],
        [1, 1],
        base,
        scale=0.5,
        density=1.0,
    )
    assert torch.allclose(out, torch.tensor([1.5, 1.5]))


def test_task_arithmetic_default_scale_is_one_over_n() -> None:
    base = torch.zeros(2)
    out = merge_tensor(
        "task_arithmetic",
        [torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])],
        [1, 1],
        base,
        scale=None,
        density=1.0,
    )
    assert torch.allclose(out, torch.tensor([1.5, 1.5]))


def test_trim_keeps_largest_magnitudes() -> None:
    assert torch.equal(
        trim_by_magnitude(torch.tensor([1.0, -2.0, 3.0, 0.5]), 0.5), torch.tensor([0.0, -2.0, 3.0, 0.0])
    )


def test_sign_consensus_disjoint_mean() -> None:
    # sum of signs: [0, -, +, +]; entry 0 has no winner; entry 2 averages the two agreeing values.
    out = sign_consensus_mean(
        [torch.tensor([0.0, -2.0, 3.0, 0.0]), torch.tensor([0.0, 0.0, 2.0, 4.0])], [1, 1]
    )
    assert torch.allclose(out, torch.tensor([0.0, -2.0, 2.5, 4.0]))


def test_ties_by_hand() -> None:
    out = merge_tensor("ties", [T1, T2], [1, 1], BASE, scale=1.0, density=0.5)
    assert torch.allclose(out, torch.tensor([10.0, 8.0, 12.5, 14.0]))


def test_ties_default_scale_is_mergeme_third() -> None:
    out = merge_tensor("ties", [T1, T2], [1, 1], BASE, scale=None, density=0.5)
    assert torch.allclose(out, BASE + torch.tensor([0.0, -2.0, 2.5, 4.0]) / 3)


def test_ties_drops_the_minority_sign() -> None:
    base = torch.zeros(1)
    out = merge_tensor(
        "ties",
        [torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([-1.5])],
        [1, 1, 1],
        base,
        scale=1.0,
        density=1.0,
    )
    assert torch.allclose(out, torch.tensor([1.5]))


def test_dare_drops_and_rescales() -> None:
    g = torch.Generator().manual_seed(0)
    out = dare_drop(torch.ones(20000), 0.5, g)
    assert set(out.unique().tolist()) == {0.0, 2.0}
    assert out.mean().item() == pytest.approx(1.0, abs=0.03)


def test_dare_is_seeded() -> None:
    a = merge_tensor(
        "dare_linear",
        [T1, T2],
        [1, 1],
        BASE,
        scale=1.0,
        density=0.5,
        generator=torch.Generator().manual_seed(7),
    )
    b = merge_tensor(
        "dare_linear",
        [T1, T2],
        [1, 1],
        BASE,
        scale=1.0,
        density=0.5,
        generator=torch.Generator().manual_seed(7),
    )
    assert torch.equal(a, b)


def test_dare_at_full_density_equals_task_arithmetic() -> None:
    g = torch.Generator().manual_seed(0)
    dare = merge_tensor("dare_linear", [T1, T2], [1, 1], BASE, scale=0.5, density=1.0, generator=g)
    ta = merge_tensor("task_arithmetic", [T1, T2], [1, 1], BASE, scale=0.5, density=1.0)
    assert torch.allclose(dare, ta)


def test_dare_ties_at_full_density_equals_ties() -> None:
    g = torch.Generator().manual_seed(0)
    a = merge_tensor("dare_ties", [T1, T2], [1, 1], BASE, scale=1.0, density=1.0, generator=g)
    b = merge_tensor("ties", [T1, T2], [1, 1], BASE, scale=1.0, density=1.0)
    assert torch.allclose(a, b)


def test_task_vector_methods_need_a_base() -> None:
    with pytest.raises(ValueError, match="base"):
        merge_tensor("ties", [T1, T2], [1, 1], None, scale=1.0, density=0.5)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_lean_sign_consensus_is_bit_identical_to_the_stacked_one(n: int) -> None:
    """The stack-free consensus (used up to SEQUENTIAL_SUM_ROWS experts) gives the stacked one's bits,
    signed zeros included, for unit and non-unit weights."""
    from merge.methods import _sign_consensus_mean_stacked

    gen = torch.Generator().manual_seed(n)
    size = 100_003
    for weights in ([1.0] * n, [0.5 + 0.37 * i for i in range(n)]):
        taus = [
            torch.randn(size, generator=gen)
            * torch.logspace(-8, 8, size)[torch.randperm(size, generator=gen)]
            for _ in range(n)
        ]
        for i, tau in enumerate(taus):
            tau[:: i % 4 + 2] = 0.0 if i % 2 else -0.0
        lean = sign_consensus_mean(taus, weights)
        stacked = _sign_consensus_mean_stacked(taus, weights)
        assert torch.equal(lean.view(torch.int32), stacked.view(torch.int32))


@pytest.mark.parametrize("rank_share", [0.0, 0.2, 0.5, 1.0])
def test_block_kth_magnitude_equals_kthvalue(rank_share: float) -> None:
    """The histogram selection gives kthvalue's exact value, with zeros, ties and a wide range."""
    from merge.methods import kth_smallest_magnitude

    gen = torch.Generator().manual_seed(7)
    values = (torch.randn(50_001, generator=gen) * torch.logspace(-10, 10, 50_001)).abs()
    values[::3] = 0.0
    values[1::7] = values[5]
    rank = max(1, int(rank_share * values.numel()))
    blocks = [values[i : i + 4096] for i in range(0, values.numel(), 4096)]
    want = float(values.kthvalue(rank).values)
    assert kth_smallest_magnitude(blocks.__getitem__, len(blocks), rank) == want
    with ThreadPoolExecutor(3) as pool:  # on threads, blocks done in any order: the same value
        assert kth_smallest_magnitude(blocks.__getitem__, len(blocks), rank, pool.map) == want
