"""token_logprob_entropy and eg_grpo_shaping: fused (Triton, C++) vs the torch eager reference and its torch.compile
(bench/compiled.py), bf16 T2I-R1 shapes.

Shapes (Janus-Pro T2I-R1 / EG-GRPO, 16 sequences per step):
* ``image``: 16 x 576 image tokens, V = 16,384 (the image codebook);
* ``text``: 16 x 256 CoT tokens, V = 102,400 (the text vocabulary).

Cases: ``forward`` (logp + entropy, no grad), ``train`` (forward + backward of ``logp.sum() + entropy.sum()``),
``shaping`` (`eg_grpo_shaping` forward: logp, normalised entropy, masks, shaped advantages; it checks the targets
and modality values, which costs one device-to-host read at the end of each call on CUDA), ``shaping_novalidate``
(the same call with ``validate=False``, as the AR trainer makes it: no host read, so calls queue back to back;
torch and Triton only).
Minimum bytes: the bf16 logits read once per pass over V (forward 1x, train 2x) plus the gradient written once.

Peak extra memory (``peak_extra_memory_bytes``) is measured on one extra call outside the timed rounds
(``harness.peak_extra_memory``: CUDA allocator peak, or the growth of the process's peak RSS on CPU).

``impl="compiled"``: the reference's formula under torch.compile on the bench device (shaping: with the sort-based
masks of the torch path), compiled and warmed up before timing.

On CPU the torch reference, its compiled twin and the C++ extension (``impl="cpp"``) run, at a scaled-down batch
(``cpu_scale`` in extra_info: 2 sequences instead of 16), so that the eager float32 intermediates of V = 102,400
stay within seconds and a few GB. The C++ path always runs on CPU tensors; it is compared with the torch reference
(and the compiled one) on machines without CUDA (``bench/report.py`` prints the ratios).
"""
import pytest
import torch

from fastgrpo import eg_grpo_shaping, token_logprob_entropy, token_logprob_entropy_ref
from fastgrpo.testing import assert_close
import compiled
from harness import impl_device, measure, require_cpp, require_cuda

SHAPES = {"image": (16, 576, 16_384), "text": (16, 256, 102_400)}
CPU_SEQUENCES = 2
IMPLS = ["torch", "compiled", "triton", "cpp"]


def _inputs(shape_name, device):
    B, L, V = SHAPES[shape_name]
    scale = None
    if device.type == "cpu":
        B, scale = CPU_SEQUENCES, f"{CPU_SEQUENCES}/{SHAPES[shape_name][0]} sequences on CPU"
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, L, V, generator=g) * 2).to(device=device, dtype=torch.bfloat16)
    targets = torch.randint(0, V, (B, L), generator=g).to(device)
    return logits, targets, scale


def _run(benchmark, fn, check, logits, targets, impl, case, shape_name, scale, passes, info):
    R, V = targets.numel(), logits.shape[-1]
    on_cpu = logits.device.type == "cpu"
    measure(benchmark, fn, check=check, bytes_moved=passes * R * V * logits.element_size() + 16 * R,
            dtype=logits.dtype, shapes={"logits": tuple(logits.shape)}, impl=impl, case=case,
            shape_name=shape_name, cpu_scale=scale, rounds=5 if on_cpu else 20, warmup=1 if on_cpu else 3,
            device=logits.device, **info)


def _rows_check(logits, targets, rows=64, **kw):
    """Check against the float64 oracle on a slice of rows (the full float64 [R, V] would not fit beside)."""
    x64 = logits.reshape(-1, logits.shape[-1])[:rows].double()
    return token_logprob_entropy_ref(x64, targets.reshape(-1)[:rows], **kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("case", ["forward", "shaping", "shaping_novalidate"])
def test_forward(benchmark, bench_device, impl, shape_name, case):
    """``forward``: token_logprob_entropy without grad; ``shaping``: eg_grpo_shaping (normalised entropy);
    ``shaping_novalidate``: the same with ``validate=False``."""
    if case == "shaping_novalidate" and impl in ("compiled", "cpp"):
        pytest.skip("validate=False changes the torch and Triton paths only (compiled has no check; cpp checks on "
                    "the host at no cost)")
    if impl == "triton":
        require_cuda(impl)
    if impl == "cpp":
        require_cpp()
    device = impl_device(impl, bench_device)
    if impl == "compiled":
        compiled.only_in_correctness_runs_at(benchmark, device, shape_name == "image", "the image shape")
    logits, targets, scale = _inputs(shape_name, device)
    modality = torch.full(targets.shape, 1 if shape_name == "image" else 0, device=device)
    advantages = torch.randn(targets.shape[0], generator=torch.Generator().manual_seed(1)).to(device)

    info = {}
    if impl == "compiled":
        args = (logits, targets, modality, advantages) if case == "shaping" else (logits, targets)

        def run(op):
            with torch.no_grad():
                return op(*args)

        fn, info = compiled.prepare(benchmark, compiled.eg_grpo_shaping if case == "shaping"
                                    else compiled.token_logprob_entropy, *args, run=run)
    else:
        def fn():
            with torch.no_grad():
                if case != "forward":
                    return eg_grpo_shaping(logits, targets, modality, advantages, impl=impl,
                                           validate=case == "shaping")
                return token_logprob_entropy(logits, targets, impl=impl)
    close = compiled.assert_close if impl == "compiled" else assert_close

    def check(out):
        ref_logp, ref_ent = _rows_check(logits, targets, normalize=case != "forward")
        close(out[0].reshape(-1)[:64], ref_logp, name="logp")
        close(out[1].reshape(-1)[:64], ref_ent, name="entropy")
        if case != "forward":  # (logp, entropy, token_adv, low, high)
            assert out[4].any() and out[3].any()

    _run(benchmark, fn, check, logits, targets, impl, case, shape_name, scale, passes=1, info=info)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_train(benchmark, bench_device, impl, shape_name):
    if impl == "triton":
        require_cuda(impl)
    if impl == "cpp":
        require_cpp()
    if impl == "compiled":
        compiled.only_in_correctness_runs_at(benchmark, impl_device(impl, bench_device), shape_name == "image",
                                             "the image shape")
    logits, targets, scale = _inputs(shape_name, impl_device(impl, bench_device))
    logits.requires_grad_(True)
    info = {}

    def run(op):
        logp, ent = op(logits, targets)
        (grad,) = torch.autograd.grad(logp.sum() + ent.sum(), logits)
        return logp.detach(), grad

    if impl == "compiled":
        fn, info = compiled.prepare(benchmark, compiled.token_logprob_entropy, logits, targets, run=run)
    else:
        fn = lambda: run(lambda lg, tg: token_logprob_entropy(lg, tg, impl=impl))  # noqa: E731
    close = compiled.assert_close if impl == "compiled" else assert_close

    def check(out):
        x64 = logits.detach().reshape(-1, logits.shape[-1])[:16].double().requires_grad_(True)
        ref_logp, ref_ent = token_logprob_entropy_ref(x64, targets.reshape(-1)[:16])
        (g64,) = torch.autograd.grad(ref_logp.sum() + ref_ent.sum(), x64)
        close(out[0].reshape(-1)[:16], ref_logp.detach(), name="logp")
        close(out[1].reshape(-1, logits.shape[-1])[:16], g64, name="grad logits")

    _run(benchmark, fn, check, logits, targets, impl, "train", shape_name, scale, passes=3, info=info)
