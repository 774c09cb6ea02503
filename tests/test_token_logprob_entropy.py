"""token_logprob_entropy against its float64 reference: both backends, three dtypes, hard rows, gradients."""
import math

import pytest
import torch

from fastgrpo import token_logprob_entropy, token_logprob_entropy_ref
from fastgrpo.testing import assert_close, poisoned_allocations

IMPLS = ["torch", "triton", "cpp"]
FUSED = ["triton", "cpp"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGNORE = -100


def _logits(B, L, V, dtype, device, seed):
    """Random logits with hard rows: very negative, uniform, one-hot-like; plus ignored targets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, V, generator=g) * 3
    x[0, 0] = x[0, 0] / 3 - 1e4  # very negative row (a running max started at 0 would underflow)
    x[0, 1] = 0.7  # uniform row: entropy = log V
    x[1, 0, V // 3] += 80.0  # one-hot-like row: entropy ~ 0
    t = torch.randint(0, V, (B, L), generator=g)
    t[1, 0] = V // 3
    t[1, 1] = IGNORE
    t[-1, -1] = IGNORE
    return x.to(dtype).to(device), t.to(device)


def _ref64(x, t, **kw):
    return token_logprob_entropy_ref(x.detach().double(), t, **kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [7, 4099])
@pytest.mark.parametrize("temperature, normalize", [(1.0, False), (0.7, True)])
def test_forward_matches_float64_reference(impl, dtype, V, temperature, normalize, device):
    x, t = _logits(3, 5, V, dtype, device, seed=V)
    with poisoned_allocations():
        logp, ent = token_logprob_entropy(x, t, temperature=temperature, normalize=normalize, impl=impl)
    ref_logp, ref_ent = _ref64(x, t, temperature=temperature, normalize=normalize)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == t.shape
    assert_close(logp, ref_logp, name="logp")
    assert_close(ent, ref_ent, name="entropy")
    # Independent facts: the uniform row has entropy log V, the ignored rows give zeros.
    full = math.log(V) / (math.log(V) if normalize else 1.0)
    assert_close(ent[0, 1:2], torch.tensor([full], dtype=torch.float64), name="uniform entropy")
    assert_close(ent[0, 0:1], ref_ent[0, 0:1], name="very negative row")
    assert ent[1, 0] < 1e-3 and abs(logp[1, 0]) < 1e-3  # one-hot-like row
    assert logp[1, 1] == 0 and ent[1, 1] == 0 and logp[-1, -1] == 0 and ent[-1, -1] == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [33, 4099])
def test_gradients_match_float64_autograd(impl, dtype, V, device):
    x, t = _logits(2, 4, V, dtype, device, seed=10 + V)
    g = torch.Generator().manual_seed(3)
    w_lp, w_h = torch.randn(2, 4, generator=g).to(device), torch.randn(2, 4, generator=g).to(device)
    xl = x.clone().requires_grad_(True)
    with poisoned_allocations():
        logp, ent = token_logprob_entropy(xl, t, temperature=0.9, normalize=True, impl=impl)
        (grad,) = torch.autograd.grad((w_lp * logp).sum() + (w_h * ent).sum(), xl)
    x64 = x.detach().double().requires_grad_(True)
    ref_logp, ref_ent = token_logprob_entropy_ref(x64, t, temperature=0.9, normalize=True)
    (grad64,) = torch.autograd.grad((w_lp.double() * ref_logp).sum() + (w_h.double() * ref_ent).sum(), x64)
    assert grad.dtype == dtype and grad.shape == x.shape
    assert_close(grad, grad64, name="grad logits")
    ignored = t == IGNORE
    assert torch.count_nonzero(grad[ignored]) == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_gradient_of_one_output(impl, which, device):
    """Backward with only logp or only the entropy used (the fused backward drops the other term)."""
    x, t = _logits(2, 3, 301, torch.float32, device, seed=4)
    xl = x.clone().requires_grad_(True)
    out = dict(zip(("logp", "entropy"), token_logprob_entropy(xl, t, impl=impl)))
    (grad,) = torch.autograd.grad(out[which].sum(), xl)
    x64 = x.double().requires_grad_(True)
    ref = dict(zip(("logp", "entropy"), token_logprob_entropy_ref(x64, t)))
    (grad64,) = torch.autograd.grad(ref[which].sum(), x64)
    assert_close(grad, grad64, name=f"grad of {which}")


@pytest.mark.parametrize("impl", FUSED)
def test_closed_form_gradients(impl, device):
    """dlogp = (onehot - p)/T and dH = -p (z - E_p z)/T, against softmax in float64 (not via autograd)."""
    V, T = 129, 1.3
    x, t = _logits(2, 3, V, torch.float32, device, seed=5)  # rows [0, 1:]: the uniform row and a random one
    z = x.double() / T
    p = torch.softmax(z, -1)
    onehot = torch.nn.functional.one_hot(t.clamp(min=0), V).double()  # ignored rows are not compared
    for which, want in (("logp", (onehot - p) / T),
                        ("entropy", -p * (z - (p * z).sum(-1, keepdim=True)) / T)):
        xl = x.clone().requires_grad_(True)
        logp, ent = token_logprob_entropy(xl, t, temperature=T, impl=impl)
        (grad,) = torch.autograd.grad((logp if which == "logp" else ent)[0, 1:].sum(), xl)
        assert_close(grad[0, 1:], want[0, 1:], name=f"closed-form grad of {which}")


# The forward kernel's variants (`fwd_config`): per-lane statistics (the default) or the blocked update, each with
# the blocks loaded in their loop step or one step ahead (PREFETCH).
FORWARD_VARIANTS = pytest.mark.parametrize(
    "lanes,prefetch", [(True, False), (False, False), (True, True), (False, True)],
    ids=["lanes", "blocked", "lanes-prefetch", "blocked-prefetch"])


def _forward_variant(monkeypatch, lanes, prefetch):
    """Run the Triton forward in one variant of `FORWARD_VARIANTS`."""
    import fastgrpo.kernels.token_entropy as k

    original = k.fwd_config
    monkeypatch.setattr(k, "fwd_config", lambda V: {**original(V), "LANES": lanes, "PREFETCH": prefetch})


@FORWARD_VARIANTS
def test_rows_split_across_programs_merge_exactly(monkeypatch, lanes, prefetch, device):
    """Small blocks force many chunks per row: a chunk of -1e4 logits, a chunk of -inf, targets in late chunks."""
    import fastgrpo.kernels.token_entropy as k

    monkeypatch.setattr(k, "MAX_BLOCK", 256)
    monkeypatch.setattr(k, "MAX_ITERS", 2)
    _forward_variant(monkeypatch, lanes, prefetch)
    V = 4099
    assert k.blocking(V)[2] == 9
    x, t = _logits(2, 3, V, torch.float32, device, seed=6)
    x[1, 1, :600] -= 1e4  # first chunk far below the rest
    x[1, 2, 512:1024] = -float("inf")  # one whole chunk masked out
    x[1, 2, 3000:3005] = -float("inf")
    t[1, 1], t[1, 2] = 4098, 4000
    xl = x.clone().requires_grad_(True)
    logp, ent = token_logprob_entropy(xl, t, temperature=0.8, impl="triton")
    (grad,) = torch.autograd.grad(logp.sum() + ent.sum(), xl)
    x64 = x.double().requires_grad_(True)
    ref_logp, ref_ent = token_logprob_entropy_ref(x64, t, temperature=0.8)
    (grad64,) = torch.autograd.grad(ref_logp.sum() + ref_ent.sum(), x64)
    assert_close(logp, ref_logp, name="logp")
    assert_close(ent, ref_ent, name="entropy")
    assert_close(grad, grad64, name="grad")
    assert torch.count_nonzero(grad[1, 2, 512:1024]) == 0


@FORWARD_VARIANTS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.05, 3.0])
@pytest.mark.parametrize("V", [203, 208], ids=["partial-last-block", "whole-blocks"])
def test_forward_variants_on_rows_that_move_every_lane_max(monkeypatch, lanes, prefetch, dtype, temperature, V,
                                                           device):
    """A 16-logit block over rows of 203 (13 steps, the last partial) or 208 (13 whole blocks: the unmasked
    loads of EVEN_V): every lane's max moves at every step (an increasing row), never after the first (a
    decreasing row), a lane whose first finite logit comes at the last step (the rest of its column -inf), -1e4
    offsets, alternating -inf, an ignored row of NaN logits (read by no step, prefetched or not); forward and
    gradient against float64."""
    import fastgrpo.kernels.token_entropy as k

    monkeypatch.setattr(k, "MAX_BLOCK", 16)
    _forward_variant(monkeypatch, lanes, prefetch)
    g = torch.Generator().manual_seed(91)
    x = torch.randn(2, 6, V, generator=g) * 4
    ramp = torch.linspace(-30, 30, V)
    x[0, 0] = ramp  # increasing: each lane's max moves at every step
    x[0, 1] = -ramp  # decreasing: each lane's max is set at the first step
    x[0, 2] = -float("inf")
    x[0, 2, 16 * 12 + 3] = 2.0  # lane 3 sees its first finite logit at the last (partial) step
    x[0, 2, 5] = -1.0
    x[0, 3, ::2] = -float("inf")
    x[0, 4] = ramp - 1e4
    x[0, 5, 100:] += 1e4 / 2  # the max jumps by 5,000 halfway
    x[1, 4] = float("nan")
    t = torch.randint(0, V, (2, 6), generator=g)
    t[0, 2], t[0, 3], t[1, 4] = 16 * 12 + 3, 1, IGNORE
    x = x.to(dtype).to(device)
    t = t.to(device)
    xl = x.clone().requires_grad_(True)
    logp, ent = token_logprob_entropy(xl, t, temperature=temperature, impl="triton")
    (grad,) = torch.autograd.grad(logp.sum() + 0.5 * ent.sum(), xl)
    # the ignored row's logits do not matter (0, 0 and no gradient): the float64 autograd gets zeros there, as its
    # log-softmax backward would turn the NaN into NaN gradients
    x64 = x.double().masked_fill(x.isnan(), 0.0).requires_grad_(True)
    ref_logp, ref_ent = token_logprob_entropy_ref(x64, t, temperature=temperature)
    (grad64,) = torch.autograd.grad(ref_logp.sum() + 0.5 * ref_ent.sum(), x64)
    assert_close(logp, ref_logp, name="logp")
    assert_close(ent, ref_ent, name="entropy")
    assert_close(grad, grad64, name="grad")
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()


def test_cpp_rows_spanning_many_blocks(device):
    """The C++ kernel's online softmax across its staging blocks: a first block of -1e4 logits, a whole block of
    -inf, a row whose first block is all -inf, the max in the last partial block, targets in late blocks, a low
    temperature, float64 logits; forward and gradient against float64 autograd."""
    from fastgrpo import _ext

    if not _ext.available():
        pytest.skip(f"the C++ extension fastgrpo._C is not usable: {_ext.failure_reason()}")
    blk = _ext.load().BLOCK
    V = 4 * blk + 5
    for dtype, temperature in ((torch.float32, 0.8), (torch.bfloat16, 0.05), (torch.float64, 1.7)):
        x, t = _logits(2, 3, V, torch.float32, torch.device("cpu"), seed=16)
        x[1, 1, :blk + 3] -= 1e4  # first block (and a bit) far below the rest
        x[1, 2, blk:2 * blk] = -float("inf")  # one whole block masked out
        x[1, 2, 3 * blk + 1:3 * blk + 9] = -float("inf")
        x[0, 2, :blk] = -float("inf")  # the running max stays -inf through a whole block
        x[0, 2, V - 2] += 30.0  # and the max arrives in the last, partial block
        t[1, 1], t[1, 2], t[0, 2] = V - 1, 3 * blk, V - 2
        x = x.to(dtype)
        xl = x.clone().requires_grad_(True)
        logp, ent = token_logprob_entropy(xl, t, temperature=temperature, normalize=True, impl="cpp")
        (grad,) = torch.autograd.grad(logp.sum() + 0.5 * ent.sum(), xl)
        x64 = x.double().requires_grad_(True)
        ref_logp, ref_ent = token_logprob_entropy_ref(x64, t, temperature=temperature, normalize=True)
        (grad64,) = torch.autograd.grad(ref_logp.sum() + 0.5 * ref_ent.sum(), x64)
        assert_close(logp, ref_logp, name=f"logp {dtype} T={temperature}")
        assert_close(ent, ref_ent, name=f"entropy {dtype} T={temperature}")
        assert_close(grad, grad64, name=f"grad {dtype} T={temperature}")
        assert grad.dtype == dtype
        assert torch.count_nonzero(grad[1, 2, blk:2 * blk]) == 0 and torch.count_nonzero(grad[0, 2, :blk]) == 0


@pytest.mark.parametrize("impl", FUSED)
def test_long_rows_default_split(impl, device):
    """V = 40,000 spans several programs (Triton) or staging blocks (C++) at the default blocking."""
    import fastgrpo.kernels.token_entropy as k

    V = 40_000
    assert k.blocking(V)[2] > 1
    x, t = _logits(2, 2, V, torch.bfloat16, device, seed=7)
    logp, ent = token_logprob_entropy(x, t, normalize=True, impl=impl)
    ref_logp, ref_ent = _ref64(x, t, normalize=True)
    assert_close(logp, ref_logp, name="logp")
    assert_close(ent, ref_ent, name="entropy")


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_slice_is_read_in_place(impl, device):
    """logits[:, p-1:-1] of a causal LM output: leading dims that do not collapse, any batch stride."""
    full, t_full = _logits(3, 9, 65, torch.float32, device, seed=8)
    x = full[:, 2:-1]
    t = t_full[:, 3:]
    assert not x.is_contiguous()
    xl = full.clone().requires_grad_(True)
    logp, ent = token_logprob_entropy(xl[:, 2:-1], t, impl=impl)
    (grad,) = torch.autograd.grad(logp.sum() + ent.sum(), xl)
    x64 = full.double().requires_grad_(True)
    ref_logp, ref_ent = token_logprob_entropy_ref(x64[:, 2:-1], t)
    (grad64,) = torch.autograd.grad(ref_logp.sum() + ref_ent.sum(), x64)
    assert_close(logp, ref_logp)
    assert_close(ent, ref_ent)
    assert_close(grad, grad64)
    assert torch.count_nonzero(grad[:, :2]) == 0 and torch.count_nonzero(grad[:, -1]) == 0


@pytest.mark.parametrize("impl", FUSED)
def test_deterministic_and_shapes(impl, device):
    x, t = _logits(2, 3, 1000, torch.bfloat16, device, seed=9)
    a = token_logprob_entropy(x, t, impl=impl)
    b = token_logprob_entropy(x, t, impl=impl)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    flat = token_logprob_entropy(x.reshape(-1, 1000), t.reshape(-1), impl=impl)
    assert torch.equal(flat[0], a[0].reshape(-1))
    one = token_logprob_entropy(x[0, 0], t[0, 0], impl=impl)  # a single row [V], target 0-d
    assert one[0].shape == () and one[0] == a[0][0, 0]


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_and_single_token_vocabulary(impl, device):
    logp, ent = token_logprob_entropy(torch.zeros(0, 4, 11, device=device), torch.zeros(0, 4, dtype=torch.long,
                                      device=device), impl=impl)
    assert logp.shape == (0, 4) and ent.shape == (0, 4)
    logp, ent = token_logprob_entropy(torch.randn(2, 3, 1, device=device), torch.zeros(2, 3, dtype=torch.long,
                                      device=device), normalize=True, impl=impl)
    assert torch.count_nonzero(logp) == 0 and torch.count_nonzero(ent) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(targets=torch.full((2, 3), 5)), r"targets must lie in \[0, 5\)"),
        (dict(targets=torch.full((2, 3), -1)), r"targets must lie in \[0, 5\)"),
        (dict(targets=torch.zeros(2, 4, dtype=torch.long)), "targets must have shape"),
        (dict(targets=torch.zeros(2, 3)), "targets must be an integer"),
        (dict(logits=torch.zeros(2, 3, 5, dtype=torch.long)), "logits must be a floating tensor"),
        (dict(temperature=0.0), "temperature must be"),
        (dict(temperature=float("nan")), "temperature must be"),
        (dict(ignore_index=1.5), "ignore_index must be an int"),
        (dict(impl="cuda"), "impl must be one of"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(kwargs, match):
    args = dict(logits=torch.zeros(2, 3, 5), targets=torch.zeros(2, 3, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        token_logprob_entropy(args.pop("logits"), args.pop("targets"), **args)


def test_ignore_index_is_allowed_outside_the_vocabulary():
    t = torch.tensor([[0, -100, 4]])
    logp, ent = token_logprob_entropy(torch.randn(1, 3, 5), t)
    assert logp[0, 1] == 0 and ent[0, 1] == 0


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        token_logprob_entropy(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), impl="triton")


def test_auto_on_cpu_uses_cpp_when_built_else_torch(cpp_disabled):
    from fastgrpo import _ext

    x, t = _logits(2, 3, 17, torch.float32, torch.device("cpu"), seed=11)
    b = token_logprob_entropy_ref(x, t)
    with cpp_disabled():
        a = token_logprob_entropy(x, t)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    if _ext.available():
        a = token_logprob_entropy(x, t)
        c = token_logprob_entropy(x, t, impl="cpp")
        assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [5, -1, 10**9])
def test_target_range_error_is_the_same_for_every_impl(impl, bad, device):
    """The Triton path reads its in-kernel flag once after the launch; the message is the host check's."""
    t = torch.zeros(2, 3, dtype=torch.long, device=device)
    t[1, 2] = bad
    t[0, 1] = IGNORE
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 5\) \(the vocabulary of logits\) or equal "
                                         r"ignore_index=-100"):
        token_logprob_entropy(torch.randn(2, 3, 5, device=device), t, impl=impl)


def test_triton_forward_is_one_launch_and_one_host_read(monkeypatch, device):
    import fastgrpo.kernels.token_entropy as k

    events = []
    kernel = k.token_stats_fwd_kernel

    class Counted:
        def __getitem__(self, grid):
            events.append(("launch", tuple(grid)))
            return kernel[grid]

    monkeypatch.setattr(k, "token_stats_fwd_kernel", Counted())
    x, t = _logits(2, 3, 4099, torch.bfloat16, device, seed=12)
    real_item = torch.Tensor.item

    def item(self):
        events.append("host read")
        return real_item(self)

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "item", item)
        m.setattr(torch.Tensor, "__bool__", lambda self: (_ for _ in ()).throw(AssertionError("host sync")))
        logp, ent = token_logprob_entropy(x, t, impl="triton")
    assert events == [("launch", (6,)), "host read"]  # one program per row, whatever V
    ref_logp, ref_ent = _ref64(x, t)
    assert_close(logp, ref_logp)
    assert_close(ent, ref_ent)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1e-39, 1e-5, 2e4, 1e300, float("inf"), -1.0])
def test_temperature_outside_the_documented_range_raises(impl, temperature, device):
    """Issue 14: T = 1e-39 gave NaN on cpp/triton and 1e300 NaN on triton; every impl now refuses T outside
    [1e-4, 1e4] with a ValueError naming temperature."""
    if impl == "cpp" and device.type != "cpu":
        pytest.skip("the C++ extension runs on the CPU")
    x, t = _logits(2, 3, 7, torch.float32, device, seed=40)
    with pytest.raises(ValueError, match="temperature must be a float in"):
        token_logprob_entropy(x, t, temperature=temperature, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1e-4, 1e4])
def test_temperature_range_ends_are_finite(impl, temperature, device):
    if impl == "cpp" and device.type != "cpu":
        pytest.skip("the C++ extension runs on the CPU")
    x, t = _logits(2, 3, 7, torch.float32, device, seed=41)
    t[t == IGNORE] = 0
    x = x.clamp(-10, 10)
    logp, ent = token_logprob_entropy(x, t, temperature=temperature, impl=impl)
    ref_logp, ref_ent = _ref64(x, t, temperature=temperature)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert_close(logp, ref_logp, name="logp")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("where", [0, 3, 6, 300])  # first, middle, last logit; a later block of a long row
def test_nan_logit_gives_nan_on_every_impl(impl, where, device):
    """Issue 14: a NaN logit gave logp = +inf on cpp (its max skipped the NaN); every impl now gives NaN."""
    if impl == "cpp" and device.type != "cpu":
        pytest.skip("the C++ extension runs on the CPU")
    V = 7 if where < 7 else 4099
    x, t = _logits(2, 3, V, torch.float32, device, seed=42)
    t[t == IGNORE] = 0
    x[0, 2, where] = float("nan")
    logp, ent = token_logprob_entropy(x, t, temperature=1.0, impl=impl)
    assert torch.isnan(logp[0, 2]) and torch.isnan(ent[0, 2])
    others = torch.ones_like(logp, dtype=torch.bool)
    others[0, 2] = False
    assert torch.isfinite(logp[others]).all() and torch.isfinite(ent[others]).all()


# ------------------------------------------------------------------------------------- validate=False


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("bad", [37, -1, 10**9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_validate_false_gives_nan_rows_and_no_gradient_there(impl, bad, dtype, device):
    """No host read: an out-of-range target's row is NaN (never a finite number) and gets no gradient; every other
    row is what the float64 reference gives with that row ignored."""
    V = 37
    x, t = _logits(3, 7, V, dtype, device, seed=70 + abs(bad) % 11)
    t[0, 3], t[2, 5] = bad, bad
    is_bad = torch.zeros_like(t, dtype=torch.bool)
    is_bad[0, 3] = is_bad[2, 5] = True
    xg = x.clone().requires_grad_(True)
    logp, ent = token_logprob_entropy(xg, t, temperature=0.9, normalize=True, impl=impl, validate=False)
    assert torch.isnan(logp[is_bad]).all() and torch.isnan(ent[is_bad]).all()
    t_ok = torch.where(is_bad, torch.full_like(t, IGNORE), t)
    x64 = x.detach().double().requires_grad_(True)
    ref_logp, ref_ent = token_logprob_entropy_ref(x64, t_ok, temperature=0.9, normalize=True)
    assert_close(logp[~is_bad], ref_logp[~is_bad], name="logp")
    assert_close(ent[~is_bad], ref_ent[~is_bad], name="entropy")
    g = torch.Generator().manual_seed(5)
    w1, w2 = torch.randn(3, 7, generator=g).to(device), torch.randn(3, 7, generator=g).to(device)
    zero = torch.zeros((), device=device)
    loss = (torch.where(is_bad, zero, logp) * w1).sum() + (torch.where(is_bad, zero, ent) * w2).sum()
    (gx,) = torch.autograd.grad(loss, xg)
    (g64,) = torch.autograd.grad((ref_logp * w1.double()).sum() + (ref_ent * w2.double()).sum(), x64)
    assert torch.isfinite(gx).all()
    assert (gx[is_bad] == 0).all()
    assert_close(gx, g64, name="grad logits")


def test_validate_false_cpp_still_raises():
    """The C++ path checks on the host, where it costs no wait: it raises whatever ``validate`` says."""
    from fastgrpo import _ext

    if not _ext.available():
        pytest.skip("C++ extension not built")
    t = torch.zeros(2, 3, dtype=torch.long)
    t[1, 1] = 9
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 5\)"):
        token_logprob_entropy(torch.randn(2, 3, 5), t, impl="cpp", validate=False)


def test_validate_false_triton_is_one_launch_and_no_host_read(monkeypatch, device):
    import fastgrpo.kernels.token_entropy as k

    events = []
    kernel = k.token_stats_fwd_kernel

    class Counted:
        def __getitem__(self, grid):
            events.append("launch")
            return kernel[grid]

    x, t = _logits(2, 3, 129, torch.bfloat16, device, seed=13)
    token_logprob_entropy(x, t, impl="triton", validate=False)  # the scratch flag buffer exists from here on
    monkeypatch.setattr(k, "token_stats_fwd_kernel", Counted())
    real_zeros = torch.zeros

    def forbidden(*a, **kw):
        raise AssertionError("host read of a device value")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu"):
            m.setattr(torch.Tensor, name, forbidden)
        m.setattr(torch, "zeros", lambda *a, **kw: events.append("zeros") or real_zeros(*a, **kw))
        logp, ent = token_logprob_entropy(x, t, impl="triton", validate=False)
    assert events == ["launch"]  # no zeroed flag, no read
    ref_logp, ref_ent = _ref64(x, t)
    assert_close(logp, ref_logp)
    assert_close(ent, ref_ent)
