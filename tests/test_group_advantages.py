"""group_advantages: each published convention, reward vs advantage aggregation, clipping, bad inputs."""
import numpy as np
import pytest
import torch

from fastgrpo import ADVANTAGE_CONVENTIONS, group_advantages, group_advantages_ref
from fastgrpo.testing import assert_close


def _rewards(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * 0.7 + 21.0


@pytest.mark.parametrize("convention", list(ADVANTAGE_CONVENTIONS))
@pytest.mark.parametrize("shape", [(5, 7), (1, 2), (3, 24)])
def test_conventions_against_loop_reference(convention, shape, device):
    r = _rewards(shape, 1).to(device)
    kw = ADVANTAGE_CONVENTIONS[convention]
    got = group_advantages(r.float(), **kw)
    assert got.dtype == torch.float32 and got.shape == shape
    assert_close(got, group_advantages_ref(r.float().double(), **kw), name=convention)


def test_conventions_match_their_sources_written_in_numpy():
    """Independent transcriptions: Flow-GRPO's tracker (numpy, global std ddof 0, +1e-4), DanceGRPO's per-group
    torch .std() (ddof 1, +1e-8), EG-GRPO (ddof 1, +1e-4); clip as configured."""
    r = _rewards((6, 9), 2).numpy()
    flow = (r - r.mean(axis=1, keepdims=True)) / (np.std(r) + 1e-4)
    fixed = (r - r.mean(axis=1, keepdims=True)) / (np.std(r, axis=1, keepdims=True) + 1e-4)
    dance = (r - r.mean(axis=1, keepdims=True)) / (np.std(r, axis=1, ddof=1, keepdims=True) + 1e-8)
    eg = (r - r.mean(axis=1, keepdims=True)) / (np.std(r, axis=1, ddof=1, keepdims=True) + 1e-4)
    expected = {"flow_grpo": np.clip(flow, -5, 5), "flow_grpo_fixed": np.clip(fixed, -5, 5),
                "dance_grpo": np.clip(dance, -5, 5), "eg_grpo": eg}
    for name, want in expected.items():
        got = group_advantages(torch.from_numpy(r), **ADVANTAGE_CONVENTIONS[name])
        assert_close(got, torch.from_numpy(want), name=name)


def test_global_std_pools_all_groups_and_mean_stays_per_group():
    r = _rewards((4, 6), 3)
    r[2] += 10.0  # one group far away: a global std sees it, each group's mean removes it
    adv = group_advantages(r, std="global", ddof=0, eps=1e-4)
    assert_close(adv.double().mean(dim=1), torch.zeros(4, dtype=torch.float64), name="group means")
    pooled = r.reshape(-1).std(correction=0)
    assert_close(adv, (r - r.mean(dim=1, keepdim=True)) / (pooled + 1e-4))


@pytest.mark.parametrize("aggregate", ["rewards", "advantages"])
@pytest.mark.parametrize("std,ddof", [("group", 1), ("global", 0)])
def test_several_rewards(aggregate, std, ddof):
    r = torch.stack([_rewards((4, 8), 4), _rewards((4, 8), 5) * 100, _rewards((4, 8), 6)], dim=2)
    w = [1.0, 0.5, 2.0]
    got = group_advantages(r, std=std, ddof=ddof, weights=w, aggregate=aggregate)
    assert got.shape == (4, 8)
    assert_close(got, group_advantages_ref(r, std=std, ddof=ddof, weights=w, aggregate=aggregate))
    if aggregate == "rewards":  # the same as normalising the weighted sum by hand
        want = group_advantages(r[..., 0] + 0.5 * r[..., 1] + 2.0 * r[..., 2], std=std, ddof=ddof)
    else:  # the weighted sum of each reward's own advantages
        want = sum(wi * group_advantages(r[..., i], std=std, ddof=ddof).double() for i, wi in enumerate(w))
    assert_close(got, want.double())
    # Default weights are all 1; a single reward in [P, G, 1] equals the plain [P, G] call.
    assert_close(group_advantages(r, aggregate=aggregate),
                 group_advantages_ref(r, weights=[1, 1, 1], aggregate=aggregate))
    assert_close(group_advantages(r[..., :1], aggregate=aggregate), group_advantages(r[..., 0]).double())


def test_clip_constant_group_and_one_group():
    r = torch.tensor([[0.0, 0.0, 0.0, 100.0], [3.0, 3.0, 3.0, 3.0]], dtype=torch.float64)
    adv = group_advantages(r, std="group", ddof=0, eps=1e-4, clip=1.5)
    assert adv.abs().max() <= 1.5 and adv[0, 3] == 1.5
    assert torch.equal(adv[1], torch.zeros(4))  # a constant group: advantages 0 (not NaN)
    assert_close(adv, group_advantages_ref(r, std="group", ddof=0, eps=1e-4, clip=1.5))
    row = _rewards((5,), 8)
    one = group_advantages(row, ddof=1)
    assert one.shape == (5,)
    assert torch.equal(one, group_advantages(row.view(1, 5), ddof=1)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_rewards(dtype):
    r = _rewards((3, 12), 9).to(dtype)
    assert_close(group_advantages(r, ddof=1), group_advantages_ref(r.double(), ddof=1))


def test_bad_inputs_raise():
    r = _rewards((3, 4), 10)
    cases = [
        (dict(std="batch"), "std must be one of"),
        (dict(aggregate="mean"), "aggregate must be one of"),
        (dict(ddof=-1), "ddof must be an int"),
        (dict(ddof=1.0), "ddof must be an int"),
        (dict(ddof=4), "ddof=4 needs more than"),
        (dict(eps=0.0), "eps must be a float > 0"),
        (dict(clip=0.0), "clip must be None or a float > 0"),
        (dict(weights=[1.0]), "weights are for several rewards"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            group_advantages(r, **kw)
    with pytest.raises(ValueError, match="weights must have one entry per reward"):
        group_advantages(torch.stack([r, r], dim=2), weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="weights must be finite"):
        group_advantages(torch.stack([r, r], dim=2), weights=[1.0, float("nan")])
    bad = r.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="rewards contain NaN"):
        group_advantages(bad)
    with pytest.raises(ValueError, match="rewards must have shape"):
        group_advantages(r.view(1, 1, 3, 4))
    with pytest.raises(ValueError, match="rewards must be a floating tensor"):
        group_advantages(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="ddof=1 needs more than"):  # one rollout per group has no sample std
        group_advantages(torch.ones(3, 1), ddof=1)


@pytest.mark.parametrize("std,ddof,clip", [("group", 0, None), ("group", 1, 5.0), ("global", 0, 5.0),
                                           ("global", 1, None)])
def test_groups_of_different_sizes_match_numpy_per_group(std, ddof, clip):
    """Ragged groups (AEGPO's 16 / 12 / 8 rollouts per prompt): each group normalised on its own in numpy."""
    sizes = [16, 8, 12, 8, 3]
    r = _rewards((sum(sizes),), 11).numpy()
    want, start = [], 0
    pooled = np.std(r, ddof=ddof)
    for n in sizes:
        g = r[start:start + n]
        s = np.std(g, ddof=ddof) if std == "group" else pooled
        want.append((g - g.mean()) / (s + 1e-4))
        start += n
    want = np.concatenate(want)
    if clip is not None:
        want = np.clip(want, -clip, clip)
    kw = dict(std=std, ddof=ddof, eps=1e-4, clip=clip, group_sizes=sizes)
    got = group_advantages(torch.from_numpy(r).float(), **kw)
    assert got.shape == (sum(sizes),) and got.dtype == torch.float32
    assert_close(got, torch.from_numpy(want))
    assert_close(group_advantages_ref(torch.from_numpy(r), **kw), torch.from_numpy(want))


def test_equal_group_sizes_are_the_fixed_size_computation():
    r = _rewards((5, 6), 12)
    for std in ("group", "global"):
        fixed = group_advantages(r, std=std, ddof=1, clip=5.0)
        ragged = group_advantages(r.reshape(-1), std=std, ddof=1, clip=5.0, group_sizes=torch.full((5,), 6))
        assert torch.equal(ragged, fixed.reshape(-1))  # bit-identical: the same float operations
    several = torch.stack([r, 3 * r], dim=2)
    assert_close(group_advantages(several.reshape(30, 2), aggregate="advantages", group_sizes=[6, 9, 15]),
                 group_advantages_ref(several.reshape(30, 2), aggregate="advantages", group_sizes=[6, 9, 15]))


def test_bad_group_sizes_raise():
    r = _rewards((10,), 13)
    cases = [([4, 5], "group_sizes sum to 9 but rewards has 10"), ([10, 0], "group_sizes must all be >= 1"),
             ([2.0, 8.0], "group_sizes must be a non-empty 1-D sequence of ints"),
             ([], "group_sizes must be a non-empty")]
    for sizes, msg in cases:
        with pytest.raises(ValueError, match=msg):
            group_advantages(r, group_sizes=sizes)
    with pytest.raises(ValueError, match="ddof=1 needs more than 1 rewards per std .* smallest group has 1"):
        group_advantages(r, ddof=1, group_sizes=[9, 1])
    with pytest.raises(ValueError, match="with group_sizes, rewards must have shape"):
        group_advantages(r.view(1, 2, 5), group_sizes=[1])


@pytest.mark.parametrize("kwargs, msg", [
    (dict(eps=float("inf")), "eps must be a float > 0 and finite"),
    (dict(eps=True), "eps must be a float > 0 and finite"),
    (dict(eps="1e-4"), "eps must be a float > 0 and finite"),
    (dict(clip=True), "clip must be None or a float > 0"),
    (dict(weights="ab"), "weights must be a sequence or tensor of R floats"),
    (dict(weights=["a", "b"]), "weights must be a sequence or tensor of R floats"),
])
def test_issue14_bad_scalars_raise_value_error(kwargs, msg):
    """Issue 14: eps=inf / eps=True were accepted, string weights raised TypeError."""
    r = torch.randn(3, 4, 2)
    for op in (group_advantages, group_advantages_ref):
        with pytest.raises(ValueError, match=msg):
            op(r, **kwargs)


@pytest.mark.parametrize("sizes", ["34", "ab", [1.5, 2.5], [[2, 2]]])
def test_issue14_non_integer_group_sizes_raise(sizes):
    for op in (group_advantages, group_advantages_ref):
        with pytest.raises(ValueError, match="group_sizes must be a non-empty 1-D sequence of ints"):
            op(torch.randn(4), group_sizes=sizes)


@pytest.mark.parametrize("shape", [(0, 4), (0, 4, 2)])
@pytest.mark.parametrize("std", ["group", "global"])
def test_issue14_no_groups_give_an_empty_result(shape, std):
    """Issue 14: group_advantages_ref crashed on P = 0."""
    r = torch.randn(shape)
    for op in (group_advantages, group_advantages_ref):
        out = op(r, std=std)
        assert out.shape == (0, 4)
