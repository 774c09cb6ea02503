"""sde_step against its float64 reference: every kind, both backends, three input dtypes, gradients."""
import math

import pytest
import torch

from fastgrpo import sde_step, sde_step_ref
from fastgrpo.testing import assert_close, poisoned_allocations

IMPLS = ["torch", "triton", "cpp"]
FUSED = ["triton", "cpp"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KINDS = ["flow_grpo", "dance", "cps", "ode"]
NOISE_LEVEL = {"flow_grpo": 0.7, "dance": 0.3, "cps": 0.8, "ode": 0.7}
SIGMA_MAX = 0.97


def _sigmas(kind, B, device):
    """Per-sample sigmas covering the first step (sigma == 1) and the last (sigma_next == 0), random in between."""
    s = torch.rand(B, dtype=torch.float64) * 0.8 + 0.15
    sn = s * torch.rand(B, dtype=torch.float64) * 0.95
    s[0], sn[0] = 1.0, SIGMA_MAX
    if B > 1 and kind != "cps":  # cps has no KL at sigma_next == 0 (tested separately)
        sn[1] = 0.0
    return s.to(device), sn.to(device)


def _inputs(shape, dtype, device, gen_seed):
    g = torch.Generator().manual_seed(gen_seed)
    mk = lambda scale=1.0: (torch.randn(shape, generator=g) * scale).to(dtype).to(device)  # noqa: E731
    return mk(), mk(), mk(), mk(0.5)  # x, v, noise, v_ref - v


def _f64(t):
    return t.detach().to(torch.float64) if isinstance(t, torch.Tensor) else t


def _ref64(x, v, s, sn, kind, **kw):
    kw = {k: _f64(t) for k, t in kw.items()}
    return sde_step_ref(_f64(x), _f64(v), _f64(s), _f64(sn), kind=kind, noise_level=NOISE_LEVEL[kind],
                        sigma_max=SIGMA_MAX, **kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (4, 37, 3)])
def test_forward_matches_float64_reference(impl, dtype, kind, shape, device):
    x, v, noise, dv = _inputs(shape, dtype, device, 1)
    v_ref = None if kind == "ode" else (v.float() + dv.float()).to(dtype)
    s, sn = _sigmas(kind, shape[0], device)
    with poisoned_allocations():
        out = sde_step(x, v, s, sn, kind=kind, noise_level=NOISE_LEVEL[kind], sigma_max=SIGMA_MAX, noise=noise,
                       v_ref=v_ref, impl=impl)
    ref = _ref64(x, v, s, sn, kind, noise=noise, v_ref=v_ref)
    for name in ("prev_sample", "log_prob", "mean", "std", "kl"):
        got, want = getattr(out, name), getattr(ref, name)
        if want is None:
            assert got is None, name
            continue
        assert got.dtype == torch.float32, name
        assert got.shape == want.shape, name
        assert_close(got, want, name=f"{kind}/{name}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["flow_grpo", "dance", "cps"])
def test_log_prob_of_given_sample(impl, kind, device):
    """Training recomputes the log-prob of a stored sample: it equals the rollout's, and the reference's."""
    x, v, noise, _ = _inputs((5, 4, 3, 11), torch.float32, device, 2)
    s, sn = _sigmas(kind, 5, device)
    kw = dict(kind=kind, noise_level=NOISE_LEVEL[kind], sigma_max=SIGMA_MAX, impl=impl)
    rollout = sde_step(x, v, s, sn, noise=noise, **kw)
    again = sde_step(x, v, s, sn, prev_sample=rollout.prev_sample, **kw)
    assert torch.equal(again.log_prob, rollout.log_prob)  # the ratio is exactly 1 on the first inner step
    assert torch.equal(again.prev_sample, rollout.prev_sample)
    # A different, arbitrary sample: its log-prob against the float64 formula.
    other = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).to(device)
    got = sde_step(x, v, s, sn, prev_sample=other, **kw).log_prob
    assert_close(got, _ref64(x, v, s, sn, kind, prev_sample=other).log_prob)
    if kind != "cps":  # independent closed form of the Gaussian density, not via sde_step_ref
        ref = _ref64(x, v, s, sn, kind, prev_sample=other)
        dist = torch.distributions.Normal(ref.mean, ref.std.view(-1, 1, 1, 1))
        assert_close(got, dist.log_prob(_f64(other)).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_video_latents_match_float64_reference(impl, kind, device):
    """Video latents [B, C, f, h, w] (Wan's layout; odd sizes): rollout, log-prob of a given sample, KL and the
    gradient wrt v against the float64 reference; per-sample reductions run over all of C, f, h, w."""
    shape = (3, 16, 3, 5, 7)
    x, v, noise, dv = _inputs(shape, torch.float32, device, 4)
    v_ref = None if kind == "ode" else v + dv
    s, sn = _sigmas(kind, shape[0], device)
    kw = dict(kind=kind, noise_level=NOISE_LEVEL[kind], sigma_max=SIGMA_MAX, impl=impl)
    out = sde_step(x, v, s, sn, noise=noise, v_ref=v_ref, **kw)
    ref = _ref64(x, v, s, sn, kind, noise=noise, v_ref=v_ref)
    assert out.prev_sample.shape == shape and out.log_prob.shape == (3,)
    for name in ("prev_sample", "log_prob", "mean", "std", "kl"):
        if getattr(ref, name) is None:
            assert getattr(out, name) is None, name
            continue
        assert_close(getattr(out, name), getattr(ref, name), name=f"video {kind}/{name}")
    # the same step on the latents flattened to [B, N]: the 5-D layout changes nothing
    flat = sde_step(x.flatten(1), v.flatten(1), s, sn, noise=noise.flatten(1),
                    v_ref=None if v_ref is None else v_ref.flatten(1), **kw)
    assert torch.equal(flat.prev_sample.view(shape), out.prev_sample) and torch.equal(flat.log_prob, out.log_prob)
    if kind == "ode":
        return
    prev = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(device)
    vg = v.clone().requires_grad_(True)
    got = sde_step(x, vg, s, sn, prev_sample=prev, v_ref=v_ref, **kw)
    (g,) = torch.autograd.grad(got.log_prob.sum() + 0.1 * got.kl.sum(), vg)
    v64 = _f64(v).requires_grad_(True)
    want = sde_step_ref(_f64(x), v64, _f64(s), _f64(sn), kind=kind, noise_level=NOISE_LEVEL[kind],
                        sigma_max=SIGMA_MAX, prev_sample=_f64(prev), v_ref=_f64(v_ref))
    (g64,) = torch.autograd.grad(want.log_prob.sum() + 0.1 * want.kl.sum(), v64)
    assert_close(got.log_prob, want.log_prob, name="video log_prob of a given sample")
    assert_close(g, g64, name="video grad v")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kl_convention", ["flow_grpo", "exact"])
def test_gradients_match_float64_autograd(impl, dtype, kind, kl_convention, device):
    shape = (3, 6, 5, 7)
    x, v, _, dv = _inputs(shape, dtype, device, 3)
    prev = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(device)
    v_ref = None if kind == "ode" else (v.float() + dv.float()).to(dtype)
    s, sn = _sigmas(kind, shape[0], device)
    g = torch.Generator().manual_seed(5)
    w_lp, w_kl = torch.randn(3, generator=g).to(device), torch.randn(3, generator=g).to(device)
    w_mean = torch.randn(shape, generator=g).to(device)

    def loss_of(out):
        loss = (w_lp.to(out.log_prob) * out.log_prob).sum() + (w_mean.to(out.mean) * out.mean).sum()
        if out.kl is not None:
            loss = loss + (w_kl.to(out.kl) * out.kl).sum()
        return loss

    leaves = [t.clone().requires_grad_(True) for t in (x, v)] + (
        [v_ref.clone().requires_grad_(True)] if v_ref is not None else [])
    out = sde_step(leaves[0], leaves[1], s, sn, kind=kind, noise_level=NOISE_LEVEL[kind], sigma_max=SIGMA_MAX,
                   prev_sample=prev, v_ref=leaves[2] if v_ref is not None else None, kl_convention=kl_convention,
                   impl=impl)
    assert not out.prev_sample.requires_grad
    grads = torch.autograd.grad(loss_of(out), leaves)

    leaves64 = [_f64(t).requires_grad_(True) for t in leaves]
    ref = sde_step_ref(leaves64[0], leaves64[1], _f64(s), _f64(sn), kind=kind, noise_level=NOISE_LEVEL[kind],
                       sigma_max=SIGMA_MAX, prev_sample=_f64(prev),
                       v_ref=leaves64[2] if v_ref is not None else None, kl_convention=kl_convention)
    grads64 = torch.autograd.grad(loss_of(ref), leaves64)
    for name, got, want in zip(("x", "v", "v_ref"), grads, grads64):
        assert got.dtype == dtype
        assert_close(got, want, name=f"grad {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_of_log_prob_only_and_kl_only(impl, device):
    """Backward with one of the outputs unused (the fused backward skips its terms)."""
    x, v, _, dv = _inputs((2, 3, 33), torch.float32, device, 6)
    prev = torch.randn(x.shape).to(device)
    v_ref = v + dv
    for pick in ("log_prob", "kl"):
        vv = v.clone().requires_grad_(True)
        out = sde_step(x, vv, 0.6, 0.5, prev_sample=prev, v_ref=v_ref, impl=impl)
        (gv,) = torch.autograd.grad(getattr(out, pick).sum(), vv)
        v64 = _f64(v).requires_grad_(True)
        ref = sde_step_ref(_f64(x), v64, 0.6, 0.5, prev_sample=_f64(prev), v_ref=_f64(v_ref))
        (gv64,) = torch.autograd.grad(getattr(ref, pick).sum(), v64)
        assert_close(gv, gv64, name=f"grad v of {pick}")


@pytest.mark.parametrize("impl", FUSED)
def test_kl_conventions_differ_by_minus_dt(impl, device):
    """flow_grpo divides by sd^2, exact by std^2 = sd^2 * (-dt): their ratio is -dt per sample."""
    x, v, _, dv = _inputs((3, 4, 8), torch.float32, device, 7)
    s = torch.tensor([0.9, 0.7, 0.4], device=device)
    sn = torch.tensor([0.8, 0.45, 0.1], device=device)
    a = sde_step(x, v, s, sn, v_ref=v + dv, kl_convention="flow_grpo", impl=impl).kl
    b = sde_step(x, v, s, sn, v_ref=v + dv, kl_convention="exact", impl=impl).kl
    assert_close(a / b, (s - sn).double())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["flow_grpo", "dance", "cps"])
def test_internal_noise_is_standard_normal(impl, kind, device):
    """The generator path: (prev - mean) / std over many draws has mean 0 and std 1."""
    B, N = 4, 25_000
    x = torch.randn(B, N).to(device)
    v = torch.randn(B, N).to(device)
    gen = torch.Generator(device=device).manual_seed(11)
    out = sde_step(x, v, 0.75, 0.6, kind=kind, noise_level=NOISE_LEVEL[kind], generator=gen, impl=impl)
    z = ((out.prev_sample - out.mean) / out.std.view(-1, 1)).double().flatten()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 5 / math.sqrt(2 * n)
    # Fourth moment too, so a uniform or a scaled draw cannot pass.
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96 / n)
    # Same generator state -> same draw on another backend (Triton runs on CPU tensors only when interpreted).
    other = "torch" if impl == "triton" or (device.type == "cpu" and torch.cuda.is_available()) else "triton"
    again = sde_step(x, v, 0.75, 0.6, kind=kind, noise_level=NOISE_LEVEL[kind],
                     generator=torch.Generator(device=device).manual_seed(11), impl=other)
    assert_close(again.prev_sample, _f64(out.prev_sample))
    # A CPU generator with latents elsewhere draws on the CPU: the same noise whatever the device.
    cpu_draw = sde_step(x.cpu(), v.cpu(), 0.75, 0.6, kind=kind, noise_level=NOISE_LEVEL[kind],
                        generator=torch.Generator().manual_seed(12), impl="torch")
    moved = sde_step(x, v, 0.75, 0.6, kind=kind, noise_level=NOISE_LEVEL[kind],
                     generator=torch.Generator().manual_seed(12), impl=impl)
    assert_close(moved.prev_sample, _f64(cpu_draw.prev_sample))


@pytest.mark.parametrize("impl", FUSED)
def test_scalar_and_tensor_sigmas_agree(impl, device):
    x, v, noise, _ = _inputs((3, 2, 5), torch.float32, device, 8)
    a = sde_step(x, v, 0.8, 0.7, noise=noise, impl=impl)
    # float64 tensors hold the same values as the python floats (a float32 0.8 would not).
    b = sde_step(x, v, torch.tensor(0.8, dtype=torch.float64, device=device),
                 torch.full((3,), 0.7, dtype=torch.float64, device=device), noise=noise, impl=impl)
    assert torch.equal(a.log_prob, b.log_prob) and torch.equal(a.prev_sample, b.prev_sample)


@pytest.mark.parametrize("impl", FUSED)
def test_ode_kind(impl, device):
    x, v, noise, _ = _inputs((2, 3, 4), torch.float32, device, 9)
    out = sde_step(x, v, 0.5, 0.25, kind="ode", noise=noise, impl=impl)
    assert_close(out.mean, _f64(x) - 0.25 * _f64(v))
    assert torch.equal(out.prev_sample, out.mean)
    assert torch.count_nonzero(out.log_prob) == 0 and torch.count_nonzero(out.std) == 0


@pytest.mark.parametrize("impl", FUSED)
def test_deterministic_and_non_contiguous(impl, device):
    x, v, noise, _ = _inputs((3, 8, 6), torch.float32, device, 10)
    xt, vt, nt = (t.transpose(1, 2) for t in (x, v, noise))  # non-contiguous views
    a = sde_step(xt, vt, 0.9, 0.3, noise=nt, impl=impl)
    b = sde_step(xt.contiguous(), vt.contiguous(), 0.9, 0.3, noise=nt.contiguous(), impl=impl)
    assert torch.equal(a.log_prob, b.log_prob) and torch.equal(a.prev_sample, b.prev_sample)
    assert a.prev_sample.shape == xt.shape
    assert_close(a.log_prob, sde_step_ref(_f64(xt), _f64(vt), 0.9, 0.3, noise=_f64(nt)).log_prob)


@pytest.mark.parametrize("impl", FUSED)
def test_large_latent_spans_many_programs(impl, device):
    """16 x 32 x 40 per sample: several chunks per sample, reduced in a fixed order."""
    x, v, noise, dv = _inputs((2, 16, 32, 40), torch.float32, device, 12)
    out = sde_step(x, v, 0.9, 0.8, noise=noise, v_ref=v + dv, impl=impl)
    ref = _ref64(x, v, 0.9, 0.8, "flow_grpo", noise=noise, v_ref=v + dv)
    assert_close(out.log_prob, ref.log_prob)
    assert_close(out.kl, ref.kl)
    assert torch.equal(out.log_prob, sde_step(x, v, 0.9, 0.8, noise=noise, v_ref=v + dv, impl=impl).log_prob)


@pytest.mark.parametrize("impl", FUSED)
def test_extreme_magnitudes(impl, device):
    """Large latents and velocities, tiny steps: the log-prob stays finite and accurate."""
    x, v, noise, _ = _inputs((2, 3, 17), torch.float32, device, 13)
    out = sde_step(x * 1e3, v * 1e3, 0.5, 0.4999, noise=noise, impl=impl)
    ref = _ref64(x * 1e3, v * 1e3, 0.5, 0.4999, "flow_grpo", noise=noise)
    assert torch.isfinite(out.log_prob).all()
    assert_close(out.mean, ref.mean)
    # The sample differs from the mean by ~std*eps; fp32 rounding of prev (~1e3 * 6e-8) limits the log-prob.
    assert (out.log_prob.double() - ref.log_prob).abs().max() < 0.05


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl, device):
    x = torch.zeros(0, 4, 5, device=device)
    out = sde_step(x, x, 0.5, 0.4, impl=impl)
    assert out.prev_sample.shape == (0, 4, 5) and out.log_prob.shape == (0,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(v=torch.zeros(2, 3, 5)), "v must have the shape of x"),
        (dict(noise=torch.zeros(2, 3)), "noise must have the shape of x"),
        (dict(prev_sample=torch.zeros(2, 4, 4)), "prev_sample must have the shape of x"),
        (dict(v_ref=torch.zeros(1, 3, 4)), "v_ref must have the shape of x"),
        (dict(sigma=0.5, sigma_next=0.5), "sigma_next must be smaller than sigma"),
        (dict(sigma=0.4, sigma_next=0.5), "sigma_next must be smaller than sigma"),
        (dict(sigma=1.2, sigma_next=0.5), r"\[0, 1\]"),
        (dict(sigma=0.5, sigma_next=-0.1), r"\[0, 1\]"),
        (dict(sigma=1.0, sigma_next=0.9), "sigma_max"),
        (dict(sigma=torch.tensor([0.5, 1.0]), sigma_next=0.3), "sigma_max"),
        (dict(sigma=torch.tensor([0.5, 0.6, 0.7]), sigma_next=0.3), r"sigma must be a float or a tensor of shape \[2\]"),
        (dict(sigma="0.5"), "sigma must be a float"),
        (dict(kind="euler"), "kind must be one of"),
        (dict(kl_convention="kl3"), "kl_convention must be one of"),
        (dict(kind="ode", v_ref=torch.zeros(2, 3, 4)), "v_ref was given with kind='ode'"),
        (dict(kind="cps", sigma_next=0.0, v_ref=torch.zeros(2, 3, 4)), "sigma_next == 0"),
        (dict(x=torch.zeros(2, 3, 4, dtype=torch.int64)), "x must be a floating tensor"),
        (dict(v=torch.zeros(2, 3, 4, dtype=torch.int32)), "v must be a floating tensor"),
        (dict(x=torch.zeros(2)), "at least one non-batch dim"),
        (dict(noise_level=0.0), "noise_level must be > 0"),
        (dict(sigma_max=1.0, sigma=1.0), "sigma_max must be in"),
        (dict(impl="cuda"), "impl must be one of"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(kwargs, match):
    args = dict(x=torch.zeros(2, 3, 4), v=torch.zeros(2, 3, 4), sigma=0.5, sigma_next=0.4)
    args.update(kwargs)
    x, v, s, sn = args.pop("x"), args.pop("v"), args.pop("sigma"), args.pop("sigma_next")
    with pytest.raises(ValueError, match=match):
        sde_step(x, v, s, sn, **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to put one tensor elsewhere")
def test_devices_must_match():
    x = torch.zeros(2, 3, device="cuda")
    with pytest.raises(ValueError, match="v is on cpu"):
        sde_step(x, torch.zeros(2, 3), 0.5, 0.4)


def test_devices_must_match_meta():
    """Without a GPU: a tensor on the meta device stands in for 'another device'."""
    with pytest.raises(ValueError, match="noise is on meta"):
        sde_step(torch.zeros(2, 3), torch.zeros(2, 3), 0.5, 0.4, noise=torch.zeros(2, 3, device="meta"))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        sde_step(torch.zeros(2, 3), torch.zeros(2, 3), 0.5, 0.4, impl="triton")


def test_auto_on_cpu_uses_cpp_when_built_else_torch(cpp_disabled):
    """"auto" on CPU tensors: the C++ kernel when the extension is usable, the torch reference when it is not."""
    from fastgrpo import _ext

    x, v, noise, _ = _inputs((2, 3, 4), torch.float32, torch.device("cpu"), 14)
    b = sde_step_ref(x, v, 0.5, 0.4, noise=noise)
    with cpp_disabled():
        assert not _ext.available()
        a = sde_step(x, v, 0.5, 0.4, noise=noise)
        assert torch.equal(a.log_prob, b.log_prob)
    if _ext.available():
        a = sde_step(x, v, 0.5, 0.4, noise=noise)
        assert torch.equal(a.log_prob, sde_step(x, v, 0.5, 0.4, noise=noise, impl="cpp").log_prob)


# ---------------------------------------------------------------------------------------------- host work per call


def test_host_block_arithmetic_matches_triton():
    """kernels/host.py's plain-python cdiv / next_power_of_2 (the launchers' host arithmetic) give Triton's integers."""
    import triton

    from fastgrpo.kernels.host import cdiv, next_power_of_2

    g = torch.Generator().manual_seed(26)
    ns = list(range(0, 4200)) + torch.randint(0, 2**40, (300,), generator=g).tolist() + [2**31 - 1, 2**31, 2**31 + 1]
    for n in ns:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for b in (1, 3, 16, 1024, 4096):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)


@pytest.fixture
def recorded_launches():
    """The sde_step kernels' launches (names, in order), which are recorded instead of run."""
    from fastgrpo.testing import stubbed_kernels

    with stubbed_kernels("fastgrpo.kernels.sde_step") as log:
        yield log


def _aten_ops(fn):
    """The aten ops ``fn`` runs (CPU tensors: what would be device work or a host<->device copy on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    with Record():
        out = fn()
    return out, ops


# Allocations and views only: no arithmetic on [B] tensors, no copy, no reduction, no .item()/.tolist().
_HOST_ONLY_OPS = {"empty", "new_empty", "view", "select", "detach", "alias", "_reshape_alias", "reshape", "_unsafe_view"}


def test_sampling_is_two_launches_and_no_torch_op(recorded_launches):
    x, v, noise, _ = _inputs((3, 4, 37), torch.float32, torch.device("cpu"), 20)
    with torch.no_grad():
        out, ops = _aten_ops(lambda: sde_step(x, v, 0.8, 0.7, noise=noise, impl="triton"))
    assert recorded_launches == ["sde_step_fwd_kernel", "sde_step_finish_kernel"]
    assert set(ops) <= _HOST_ONLY_OPS, sorted(set(ops) - _HOST_ONLY_OPS)
    assert ops.count("empty") == 5  # mean, prev, one partial-sums buffer, log_prob, std
    assert out.mean.grad_fn is None  # no autograd.Function under no_grad


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_is_two_launches_with_float_sigmas(kind, recorded_launches):
    x, v, noise, dv = _inputs((2, 3, 5), torch.float32, torch.device("cpu"), 21)
    v_ref = None if kind == "ode" else v + dv
    _, ops = _aten_ops(lambda: sde_step(x, v, 1.0, 0.0 if kind != "cps" else 0.5, kind=kind, sigma_max=SIGMA_MAX,
                                        noise_level=NOISE_LEVEL[kind], noise=noise, v_ref=v_ref, impl="triton"))
    assert recorded_launches == ["sde_step_fwd_kernel", "sde_step_finish_kernel"]
    assert set(ops) <= _HOST_ONLY_OPS, sorted(set(ops) - _HOST_ONLY_OPS)


def test_training_step_is_three_launches(recorded_launches):
    """Forward (2) + one fused backward that takes the gradients of log_prob and kl as they come."""
    x, v, prev, dv = _inputs((3, 4, 37), torch.float32, torch.device("cpu"), 22)
    vv, v_ref = v.clone().requires_grad_(True), v + dv
    out, ops = _aten_ops(lambda: sde_step(x, vv, 0.8, 0.7, prev_sample=prev, v_ref=v_ref, impl="triton"))
    assert set(ops) <= _HOST_ONLY_OPS, sorted(set(ops) - _HOST_ONLY_OPS)
    assert recorded_launches == ["sde_step_fwd_kernel", "sde_step_finish_kernel"]
    torch.autograd.grad(out.log_prob.sum() + 0.01 * out.kl.sum(), vv)
    assert recorded_launches[2:] == ["sde_step_bwd_kernel"]


def test_cpu_sigma_tensors_are_one_copy(recorded_launches):
    """Per-sample sigmas from the CPU: checked on the host, then one [2, B] float64 tensor for the kernels."""
    x, v, noise, _ = _inputs((3, 4, 5), torch.float32, torch.device("cpu"), 23)
    s, sn = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0.8, 0.7, 0.6])
    with torch.no_grad():
        _, ops = _aten_ops(lambda: sde_step(x, v, s, sn, noise=noise, impl="triton"))
    assert recorded_launches == ["sde_step_fwd_kernel", "sde_step_finish_kernel"]
    assert not {"stack", "sum", "log", "mul", "div", "sqrt", "where", "any"} & set(ops), ops


# ---------------------------------------------------------------------------------------------- sigma checks


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sigma, sigma_next, match", [
    (torch.tensor([0.5, 1.2]), 0.3, r"\[0, 1\]"),
    (torch.tensor([0.5, 0.6], dtype=torch.float64), torch.tensor([0.4, 0.6]), "smaller than sigma"),
    (0.5, torch.tensor([0.4, -0.1]), r"\[0, 1\]"),
    (torch.tensor([0.5, float("nan")]), 0.3, r"\[0, 1\]"),
    (torch.tensor([0.5, 1.0]), torch.tensor([0.4, 0.9]), "sigma_max"),
])
def test_bad_cpu_sigma_tensor_raises(impl, sigma, sigma_next, match, device):
    x = torch.zeros(2, 3, 4, device=device)
    with pytest.raises(ValueError, match=match):
        sde_step(x, x, sigma, sigma_next, impl=impl)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_cpu_sigmas_with_latents_on_another_device(impl):
    """CPU sigma tensors are accepted with latents elsewhere (the meta device stands in for CUDA here) and
    checked on the host before anything runs."""
    x = torch.zeros(2, 3, 4, device="meta")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sde_step(x, x, torch.tensor([0.5, 1.5]), torch.tensor([0.4, 0.3]), impl=impl)
    with pytest.raises(ValueError, match="sigma_max"):
        sde_step(x, x, torch.tensor([1.0, 0.5]), 0.3, impl=impl)
    with pytest.raises(ValueError, match="sigma is on meta"):
        sde_step(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, device="meta"), 0.3, impl=impl)
    if impl == "torch":
        out = sde_step(x, x, torch.tensor([0.5, 0.6]), torch.tensor([0.4, 0.3]), noise=x, impl=impl)
        assert out.prev_sample.device.type == "meta" and out.log_prob.shape == (2,)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
def test_sigmas_on_the_device_are_checked_by_the_kernels():
    """Sigmas the host cannot read without a sync (tensors on the GPU) are checked in the kernels: an invalid
    sample gets NaN outputs, never a finite wrong number, and the valid samples are untouched."""
    from fastgrpo.kernels.sde_step import sde_step_fwd
    from fastgrpo.ops.sde import _Schedule

    B, N = 5, 37
    x, v, noise, dv = _inputs((B, N), torch.float32, torch.device("cpu"), 24)
    s = torch.tensor([0.5, 1.0, 0.3, 0.6, 1.2], dtype=torch.float64)
    sn = torch.tensor([0.4, 0.5, 0.4, -0.1, 0.5], dtype=torch.float64)
    bad = torch.tensor([False, True, True, True, True])  # ok, sigma_max missing, order, range, range
    sched = _Schedule("flow_grpo", 0.0, 0.0, s, sn, 1, 1, 0.7, 0.5, 0.0, False, False)
    prev, mean, log_prob, std, kl = sde_step_fwd(x, v, sched, eps=noise, v_ref=v + dv)
    for t in (prev, mean):
        assert torch.isnan(t[bad]).all() and torch.isfinite(t[~bad]).all()
    for t in (log_prob, std, kl):
        assert torch.isnan(t[bad]).all() and torch.isfinite(t[~bad]).all()
    ref = _ref64(x[:1], v[:1], 0.5, 0.4, "flow_grpo", noise=noise[:1], v_ref=(v + dv)[:1])
    assert_close(log_prob[:1], ref.log_prob)
    # cps with a KL at sigma_next == 0
    cps = _Schedule("cps", 0.5, 0.0, None, sn.clamp(min=0)[:2] * 0, 0, 1, 0.8, 0.5, math.sin(0.4 * math.pi), True,
                    False)
    _, _, log_prob, std, kl = sde_step_fwd(x[:2], v[:2], cps, eps=noise[:2], v_ref=(v + dv)[:2])
    assert torch.isnan(kl).all()


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_sigma_just_below_one(impl, as_tensor, device):
    """sigma in (1 - 3e-8, 1): float32 would round it to 1 (and take sigma_max); the kernels work in float64."""
    x, v, noise, dv = _inputs((2, 3, 17), torch.float32, device, 25)
    s, sn = 1 - 2e-8, 0.999
    if as_tensor:
        s, sn = (torch.full((2,), t, dtype=torch.float64, device=device) for t in (s, sn))
    out = sde_step(x, v, s, sn, sigma_max=SIGMA_MAX, noise=noise, v_ref=v + dv, impl=impl)
    ref = _ref64(x, v, s, sn, "flow_grpo", noise=noise, v_ref=v + dv)
    assert_close(out.std, ref.std, name="std")
    assert_close(out.mean, ref.mean, name="mean")
    assert_close(out.kl, ref.kl, name="kl")
    assert (out.log_prob.double() - ref.log_prob).abs().max() < 1e-3


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("kind", KINDS)
def test_float_sigma_gradients_and_expanded_inputs(impl, kind, device):
    """Scalar sigmas (the kernels' scalar arguments), the exact KL, a broadcast (stride-0) v_ref and x."""
    shape = (3, 5, 7)
    x, v, prev, dv = _inputs(shape, torch.bfloat16, device, 26)
    x = x[:1].expand(shape)
    v_ref = None if kind == "ode" else (v.float()[:1] + dv.float()[:1]).to(torch.bfloat16).expand(shape)
    s, sn = (0.6, 0.35) if kind != "ode" else (1.0, 0.0)
    leaves = [x.clone().requires_grad_(True), v.clone().requires_grad_(True)]
    kw = dict(kind=kind, noise_level=NOISE_LEVEL[kind], kl_convention="exact")
    out = sde_step(leaves[0], leaves[1], s, sn, prev_sample=prev, v_ref=v_ref, impl=impl, **kw)
    loss = out.log_prob.sum() + (out.kl.sum() if out.kl is not None else 0) + out.mean.square().mean()
    grads = torch.autograd.grad(loss, leaves)
    l64 = [_f64(t).requires_grad_(True) for t in leaves]
    ref = sde_step_ref(l64[0], l64[1], s, sn, prev_sample=_f64(prev), v_ref=_f64(v_ref), **kw)
    loss64 = ref.log_prob.sum() + (ref.kl.sum() if ref.kl is not None else 0) + ref.mean.square().mean()
    for name, got, want in zip(("x", "v"), grads, torch.autograd.grad(loss64, l64)):
        assert_close(got, want, name=f"grad {name}")
    for name in ("log_prob", "mean", "std"):
        assert_close(getattr(out, name), getattr(ref, name), name=name)


# ---------------------------------------------------------------------------------------------- CUDA only


def _captured(call, warmups: int = 1):
    """``call`` captured in a CUDA graph after ``warmups`` calls on a side stream (as torch.cuda.graph asks), then
    replayed once: (graph, the captured call's outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    graph.replay()
    torch.cuda.synchronize()
    return graph, captured


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and sync checks need a CUDA device")
def test_cuda_graph_capture_and_no_sync():
    dev = torch.device("cuda")
    x, v, noise, dv = _inputs((4, 16, 24, 24), torch.bfloat16, dev, 27)
    noise = noise.float()
    call = lambda: sde_step(x, v, 0.8, 0.7, noise=noise, impl="triton")  # noqa: E731
    with torch.no_grad():
        eager = call()
        graph, captured = _captured(call)
        for name in ("prev_sample", "log_prob", "mean", "std"):
            assert torch.equal(getattr(captured, name), getattr(eager, name)), name
        x.copy_(x * 0.5)  # new inputs in place: the replay follows them
        graph.replay()
        again = call()
        torch.cuda.synchronize()
        assert torch.equal(captured.prev_sample, again.prev_sample)
        assert torch.equal(captured.log_prob, again.log_prob)

    vg = v.clone().requires_grad_(True)
    prev = eager.prev_sample
    s_cpu, sn_cpu = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([0.8, 0.7, 0.6, 0.5])
    s_dev, sn_dev = s_cpu.to(dev), sn_cpu.to(dev)

    def steps():
        with torch.no_grad():
            sde_step(x, v, 0.8, 0.7, noise=noise, impl="triton")
            sde_step(x, v, s_cpu, sn_cpu, noise=noise, impl="triton")  # pinned, non_blocking copy
            sde_step(x, v, s_dev, sn_dev, noise=noise, impl="triton")
        out = sde_step(x, vg, s_dev, sn_dev, prev_sample=prev, v_ref=v + dv, impl="triton")
        return torch.autograd.grad(out.log_prob.sum() + 0.01 * out.kl.sum(), vg)

    steps()  # compiles every variant first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_capture_of_a_training_step():
    """A whole training call -- `sde_step` with prev_sample and v_ref (forward and finish kernels), the loss, and
    ``torch.autograd.grad`` (the backward kernel, on the stream its forward ran on) -- captured in one CUDA graph:
    a replay gives the eager call's loss and gradient bit for bit, and follows new values copied into the captured
    input (what a user who graphs the training step gets). On CPU nothing here can run; bench/gpu_session.sh
    round runs it with the other CUDA tests."""
    dev = torch.device("cuda")
    x, v, noise, dv = _inputs((4, 16, 24, 24), torch.bfloat16, dev, 29)
    prev = sde_step(x, v, 0.8, 0.7, noise=noise.float(), impl="triton").prev_sample
    v_ref = v + dv
    vg = v.clone().requires_grad_(True)

    def step():
        out = sde_step(x, vg, 0.8, 0.7, prev_sample=prev, v_ref=v_ref, impl="triton")
        loss = out.log_prob.sum() + 0.01 * out.kl.sum()
        return (loss.detach(), *torch.autograd.grad(loss, vg))

    eager = step()
    graph, captured = _captured(step, warmups=2)
    for name, got, want in zip(("loss", "grad"), captured, eager):
        assert torch.equal(got, want), name
    with torch.no_grad():
        vg.mul_(0.5)  # new values in the captured input: the replay follows them
    graph.replay()
    again = step()
    torch.cuda.synchronize()
    assert not torch.equal(again[1], eager[1])
    for name, got, want in zip(("loss", "grad"), captured, again):
        assert torch.equal(got, want), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_sigma_tensors_on_cuda():
    dev = torch.device("cuda")
    x, v, noise, dv = _inputs((3, 4, 37), torch.float32, dev, 28)
    s64 = torch.tensor([1.0, 0.6, 0.3], dtype=torch.float64)
    sn64 = torch.tensor([SIGMA_MAX, 0.0, 0.2], dtype=torch.float64)
    kw = dict(sigma_max=SIGMA_MAX, noise=noise, v_ref=v + dv, impl="triton")
    a = sde_step(x, v, s64, sn64, **kw)
    b = sde_step(x, v, s64.to(dev), sn64.to(dev), **kw)
    ref = _ref64(x, v, s64, sn64, "flow_grpo", noise=noise, v_ref=v + dv)
    for name in ("prev_sample", "log_prob", "mean", "std", "kl"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert_close(getattr(a, name), getattr(ref, name), name=name)
    with pytest.raises(ValueError, match="smaller than sigma"):
        sde_step(x, v, torch.tensor([0.5, 0.5, 0.5]), 0.6, impl="triton")
    bad = sde_step(x, v, torch.tensor([0.5, 0.5, 0.5], device=dev), torch.tensor([0.4, 0.6, 0.4], device=dev),
                   noise=noise, impl="triton")  # not checked on the host (that would sync): NaN for sample 1
    assert torch.isnan(bad.log_prob[1]) and torch.isfinite(bad.log_prob[[0, 2]]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_ode_ignores_prev_sample_on_every_impl(impl, device):
    """Issue 14: kind='ode' with prev_sample returned prev_sample on torch but the mean on cpp/triton. Decision:
    the ODE step is deterministic, prev_sample (like noise) is ignored and the mean returned everywhere."""
    x, v, noise, _ = _inputs((2, 3, 4), torch.float32, device, 21)
    out = sde_step(x, v, 0.5, 0.25, kind="ode", prev_sample=noise, impl=impl)
    assert torch.equal(out.prev_sample, out.mean)
    assert_close(out.mean, _f64(x) - 0.25 * _f64(v))
    assert torch.count_nonzero(out.log_prob) == 0
    ref = sde_step_ref(x, v, 0.5, 0.25, kind="ode", prev_sample=noise)
    assert torch.equal(ref.prev_sample, ref.mean)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kwargs, match", [
    (dict(noise_level=float("inf")), "noise_level must be a finite float"),
    (dict(noise_level=float("nan")), "noise_level must be a finite float"),
    (dict(noise_level="0.7"), "noise_level must be a finite float"),
    (dict(noise_level=None), "noise_level must be a finite float"),
    (dict(noise_level=True), "noise_level must be a finite float"),
    (dict(sigma_max="0.9", sigma=1.0), "sigma_max must be a float"),
    (dict(generator=5), "generator must be a torch.Generator"),
    (dict(kind="cps", noise_level=0.0, v_ref=torch.zeros(2, 3, 4)), "noise_level=0 with kind='cps'"),
    (dict(sigma=1e-30, sigma_next=0.0), "transition std below"),
    (dict(sigma=torch.tensor([0.5, 1e-30]), sigma_next=0.0), "transition std below"),
    (dict(kind="dance", sigma=1e-40, sigma_next=0.0), "transition std below"),
    (dict(kind="cps", sigma=0.5, sigma_next=1e-30, v_ref=torch.zeros(2, 3, 4)), "transition std below"),
])
def test_issue14_bad_scalars_raise_value_error(impl, kwargs, match):
    """Issue 14: inf noise_level gave NaN, string/None noise_level a TypeError, generator=5 an AttributeError,
    cps noise_level=0 with v_ref an inf KL, sigma=1e-30 a NaN log_prob."""
    args = dict(x=torch.zeros(2, 3, 4), v=torch.zeros(2, 3, 4), sigma=0.5, sigma_next=0.4)
    args.update(kwargs)
    x, v, s, sn = args.pop("x"), args.pop("v"), args.pop("sigma"), args.pop("sigma_next")
    with pytest.raises(ValueError, match=match):
        sde_step(x, v, s, sn, impl=impl, **args)
    if impl == "torch":
        with pytest.raises(ValueError, match=match):
            sde_step_ref(x, v, s, sn, **args)


def test_issue14_small_but_fine_sigmas_still_work():
    """The std floor refuses only what underflows: sigma = 1e-12 (std ~7e-13) keeps a finite log_prob."""
    x, v, noise, _ = _inputs((2, 3, 4), torch.float32, torch.device("cpu"), 22)
    for impl in IMPLS:
        out = sde_step(x, v, 1e-12, 0.0, noise=noise, impl=impl)
        assert torch.isfinite(out.log_prob).all(), impl


@pytest.mark.parametrize("impl", IMPLS)
def test_sigma_just_below_one_is_not_the_guard(impl, device):
    """Issue 14: in the torch path's float32, sigma = 1 - 1e-8 rounded to 1 and fired the sigma == 1 guard silently
    (std ~0.2 against ~2200 here on cpp). Every impl now decides on the float64 sigma: all match the float64
    reference."""
    x, v, noise, dv = _inputs((2, 3, 4), torch.float32, device, 23)
    s = 1 - 1e-8
    out = sde_step(x, v, s, 0.9, noise=noise, v_ref=v + dv, impl=impl, sigma_max=SIGMA_MAX)
    ref = _ref64(x, v, s, 0.9, "flow_grpo", noise=noise, v_ref=v + dv)
    assert ref.std[0] > 2000  # 0.7 * sqrt(1e8) * sqrt(0.1); the guard would give ~0.2
    for name in ("std", "mean", "prev_sample", "log_prob", "kl"):
        assert_close(getattr(out, name), getattr(ref, name), name=name)
