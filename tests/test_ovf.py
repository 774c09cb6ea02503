"""ovf_select against brute force over all subsets and an exact (rational) oracle of its tie rule; both backends."""
import itertools
from fractions import Fraction

import pytest
import torch

from fastgrpo import ovf_select, ovf_select_ref
from fastgrpo.testing import assert_close, poisoned_allocations

IMPLS = ["torch", "triton", "cpp"]


def _rule_oracle(row, k):
    """The documented rule in exact rational arithmetic: stable ascending sort, candidates j smallest + k - j
    largest, first best j. Returns (indices ascending, exact variance of every candidate, best variance)."""
    G = len(row)
    order = sorted(range(G), key=lambda i: (row[i], i))
    vals = [Fraction(row[i]) for i in order]
    s1, s2 = [Fraction(0)], [Fraction(0)]
    for v in vals:
        s1.append(s1[-1] + v)
        s2.append(s2[-1] + v * v)
    variances = []
    for j in range(k + 1):
        s = s1[j] + s1[G] - s1[G - k + j]
        q = s2[j] + s2[G] - s2[G - k + j]
        variances.append(q / k - (s / k) ** 2)
    best = max(variances)
    j = variances.index(best)
    return sorted(order[:j] + order[G - k + j:]), best


def _exact_var(row, idx):
    vals = [Fraction(row[i]) for i in idx]
    m = sum(vals) / len(vals)
    return sum((v - m) ** 2 for v in vals) / len(vals)


def _assert_optimal(rewards, out, k, variance_dtype=torch.float32):
    """Indices follow the rule exactly; where float32 scores cannot separate two candidates (exact variances
    within 1e-6 relative, yet not equal), either may be returned, but never a worse subset."""
    rows = rewards.reshape(-1, rewards.shape[-1]).double().tolist()
    got_all = out.indices.reshape(len(rows), k).tolist()
    bests = []
    for row, got in zip(rows, got_all):
        expected, best = _rule_oracle(row, k)
        assert got == sorted(set(got)) and all(0 <= i < len(row) for i in got), got
        if got != expected:
            v = _exact_var(row, got)
            assert v != best, f"tie broken against the rule: got {got}, expected {expected} (row {row})"
            assert best - v <= Fraction(1, 10**6) * best, f"suboptimal subset {got}: {float(v)} < {float(best)}"
        bests.append(float(best))
    assert out.variance.dtype == variance_dtype
    assert_close(out.variance.reshape(-1), torch.tensor(bests, dtype=torch.float64), name="variance")


def _rewards(shape, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:  # small integers: many equal rewards, exact sums in float32
        return torch.randint(-3, 4, shape, generator=g).float()
    return torch.randn(shape, generator=g) * 2 + 20  # PickScore-like: offset mean, modest spread


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("G", [1, 2, 3, 5, 8, 12])
def test_brute_force_over_all_subsets_every_k(impl, G, device):
    rewards = torch.cat([_rewards((3, G), G), _rewards((2, G), 100 + G, ties=True)]).to(device)
    r64 = rewards.double().cpu()
    for k in range(1, G + 1):
        out = ovf_select(rewards, k, impl=impl)
        assert out.indices.shape == (5, k) and out.indices.dtype == torch.int64
        subsets = torch.tensor(list(itertools.combinations(range(G), k)))
        brute = r64[:, subsets].var(dim=2, unbiased=False).amax(dim=1)  # max over all C(G, k) subsets
        picked = r64.gather(1, out.indices.cpu()).var(dim=1, unbiased=False)
        assert_close(picked, brute, name=f"variance of the chosen subset, k={k}")
        assert_close(out.variance, brute, name=f"returned variance, k={k}")
        _assert_optimal(rewards.cpu(), out, k)


def test_extremes_theorem_exactly():
    """The k+1 extreme candidates contain a global optimum: checked in exact arithmetic against every subset."""
    g = torch.Generator().manual_seed(7)
    for G in (4, 6, 9):
        for trial in range(3):
            row = (torch.randn(G, generator=g) if trial else torch.randint(0, 3, (G,), generator=g).double()).tolist()
            for k in range(1, G + 1):
                brute = max(_exact_var(row, s) for s in itertools.combinations(range(G), k))
                assert _rule_oracle(row, k)[1] == brute


@pytest.mark.parametrize("impl", IMPLS)
def test_tie_rules(impl, device):
    G = 7
    equal = torch.full((1, G), 0.25, device=device)
    # All rewards equal: every variance is 0, j = 0 wins: the k last indices of the stable order.
    assert ovf_select(equal, 3, impl=impl).indices.tolist() == [[4, 5, 6]]
    # k = 1: the largest reward; among equal largest ones the last index (it sorts last).
    r = torch.tensor([[1.0, 5.0, 2.0, 5.0, 5.0, -1.0, 0.0]], device=device)
    assert ovf_select(r, 1, impl=impl).indices.tolist() == [[4]]
    # k = G: everything, with the population variance of the whole group.
    out = ovf_select(r, G, impl=impl)
    assert out.indices.tolist() == [list(range(G))]
    assert_close(out.variance, r.double().cpu().var(dim=1, unbiased=False))
    # Symmetric data with two optimal candidates: the smallest j.
    sym = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]], device=device)
    assert ovf_select(sym, 3, impl=impl).indices.tolist() == [[0, 3, 4]]  # j=1 {0,3,4} ties j=2 {0,1,4}
    # -0.0 and +0.0 are the same reward: index order decides.
    z = torch.tensor([[0.0, -0.0, 0.0, -0.0]], device=device)
    assert ovf_select(z, 2, impl=impl).indices.tolist() == [[2, 3]]
    # Many integer ties, many groups: the exact oracle of the rule.
    ties = _rewards((12, 11), 3, ties=True).to(device)
    for k in (1, 2, 4, 5, 10, 11):
        _assert_optimal(ties.cpu(), ovf_select(ties, k, impl=impl), k)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G,k", [(48, 12), (37, 24), (13, 6), (64, 63)])
def test_larger_groups_against_exact_oracle(impl, dtype, G, k, device):
    rewards = _rewards((6, G), G + k).to(dtype).to(device)
    with poisoned_allocations():
        out = ovf_select(rewards, k, impl=impl)
    _assert_optimal(rewards.cpu(), out, k)


def test_float64_reference_and_largest_group(device):
    """The float64 torch path is the oracle: exact on its own input; the kernel's largest block (G near 1024)."""
    r = _rewards((4, 29), 11).double()
    for k in (1, 7, 28):
        _assert_optimal(r, ovf_select_ref(r, k), k, variance_dtype=torch.float64)
        _assert_optimal(r, ovf_select(r, k, impl="torch"), k)  # the public op returns float32 whatever the input
    big = _rewards((1, 1000), 12).to(device)
    out = ovf_select(big, 300, impl="triton")
    _assert_optimal(big.cpu(), out, 300)
    ref = ovf_select_ref(big.double(), 300)
    assert_close(out.variance, ref.variance.double())


@pytest.mark.parametrize("impl", IMPLS)
def test_shapes_layouts_and_empty(impl, device):
    row = _rewards((9,), 5).to(device)
    one = ovf_select(row, 4, impl=impl)
    assert one.indices.shape == (4,) and one.variance.shape == ()
    full = ovf_select(row.view(1, 9), 4, impl=impl)
    assert torch.equal(one.indices, full.indices[0]) and torch.equal(one.variance, full.variance[0])
    # A non-contiguous view (groups along dim 1 of the storage) gives the same answer as its copy.
    base = _rewards((10, 6), 6).to(device)
    view = base.t()
    assert torch.equal(ovf_select(view, 3, impl=impl).indices, ovf_select(view.contiguous(), 3, impl=impl).indices)
    empty = ovf_select(torch.empty(0, 8, device=device), 3, impl=impl)
    assert empty.indices.shape == (0, 3) and empty.variance.shape == (0,)
    assert not ovf_select(row.requires_grad_(True), 2, impl=impl).variance.requires_grad


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_inputs_raise(impl, device):
    r = torch.randn(3, 6, device=device)
    with pytest.raises(ValueError, match="k must satisfy"):
        ovf_select(r, 0, impl=impl)
    with pytest.raises(ValueError, match="k must satisfy"):
        ovf_select(r, 7, impl=impl)
    for bad_k in (2.0, True):
        with pytest.raises(ValueError, match="k must be a python int"):
            ovf_select(r, bad_k, impl=impl)
    for bad in (float("nan"), float("inf")):
        rr = r.clone()
        rr[1, 2] = bad
        with pytest.raises(ValueError, match="rewards contain NaN"):
            ovf_select(rr, 2, impl=impl)
    with pytest.raises(ValueError, match="rewards must have shape"):
        ovf_select(r.view(3, 2, 3), 2, impl=impl)
    with pytest.raises(ValueError, match="rewards must be a floating tensor"):
        ovf_select(torch.ones(3, 6, dtype=torch.int64, device=device), 2, impl=impl)
    with pytest.raises(ValueError, match="rewards must be a torch.Tensor"):
        ovf_select([[1.0, 2.0]], 1, impl=impl)
    with pytest.raises(ValueError, match="impl must be one of"):
        ovf_select(r, 2, impl="fast")


def test_triton_group_limit(device):
    r = torch.randn(1, 1025, device=device)
    with pytest.raises(ValueError, match="groups of up to 1024"):
        ovf_select(r, 3, impl="triton")
    out = ovf_select(r, 3, impl="auto")  # falls back to the torch path
    _assert_optimal(r.cpu(), out, 3)


@pytest.mark.parametrize("impl", ["cpp"])
def test_cpp_any_group_size_and_strides(impl, device):
    """The C++ kernel has no group limit: G = 2000 against the exact oracle; bf16 rewards read through a
    transposed view; float64 rewards rounded to float32 first."""
    big = _rewards((2, 2000), 13)
    for k in (1, 37, 1999):
        _assert_optimal(big, ovf_select(big, k, impl=impl), k)
    ties = _rewards((9, 15), 14, ties=True).to(torch.bfloat16)
    view = ties.t().contiguous().t()  # same values, column stride != 1
    assert view.stride(1) != 1
    for k in (2, 7, 15):
        out = ovf_select(view, k, impl=impl)
        _assert_optimal(ties, out, k)
        assert torch.equal(out.indices, ovf_select(ties, k, impl=impl).indices)
    r64 = _rewards((4, 29), 15).double()
    _assert_optimal(r64.float(), ovf_select(r64, 9, impl=impl), 9)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("value, dtype", [(1e30, torch.float32), (1e39, torch.float64), (-1e300, torch.float64),
                                          (1e18, torch.float32)])
def test_rewards_beyond_the_float32_score_range_raise(impl, value, dtype, device):
    """Issue 14: float64 rewards beyond float32 range gave a wrong subset and NaN variance on cpp/triton (checked
    finite before the cast), and |r| ~ 1e30 a non-optimal subset on torch/triton (k * sum r^2 overflowed)."""
    if impl == "cpp" and device.type != "cpu":
        pytest.skip("the C++ extension runs on the CPU")
    r = _rewards((2, 48), 30).to(dtype)
    r[1, 5] = value
    with pytest.raises(ValueError, match=r"rewards must satisfy \|r\| <="):
        ovf_select(r.to(device), 24, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_large_rewards_within_the_limit_are_optimal(impl, device):
    from fastgrpo.ops.ovf import max_abs_reward

    if impl == "cpp" and device.type != "cpu":
        pytest.skip("the C++ extension runs on the CPU")
    G, k = 12, 5
    r = torch.randn(3, G, generator=torch.Generator().manual_seed(31), dtype=torch.float64)
    r = r / r.abs().max() * max_abs_reward(G, k)
    out = ovf_select(r.to(device), k, impl=impl)
    assert torch.isfinite(out.variance).all()
    _assert_optimal(r.float().double(), out, k)
