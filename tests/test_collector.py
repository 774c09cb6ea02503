"""AttentionEntropyCollector on tiny SD3.5-shaped (4 joint blocks, dual attention) and FLUX (3 double + 1 single
blocks) transformers: Entropy(t) against a float64 eager computation from the q and k that diffusers' own
processors produce, model outputs unchanged, processors restored, peft LoRA honoured, bad inputs rejected, blocks
compiled in place run eagerly when selected."""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from fastgrpo.diffusion import AttentionEntropyCollector
from fastgrpo.diffusion.tiny import tiny_flux_transformer, tiny_sd3_transformer
from fastgrpo.testing import assert_close, cuda_syncs

B, T = 2, 7  # batch, text tokens (SD3 images: 16x16 latents, patch 2 -> 64 image tokens; FLUX: 37 image tokens)
FLUX_IMAGE_TOKENS = 37
LAYERS = {"sd3": (1, 3), "flux": (0, 2)}


def _model(kind):
    if kind == "sd3":
        return tiny_sd3_transformer(num_layers=4, dual_attention_layers=(0, 1))
    return tiny_flux_transformer()


def _inputs(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(B, T, 32, generator=g)
    pooled = torch.randn(B, 16, generator=g)
    if kind == "sd3":
        return dict(hidden_states=torch.randn(B, 4, 16, 16, generator=g), encoder_hidden_states=text,
                    pooled_projections=pooled, timestep=torch.tensor([500.0, 800.0]))
    ids = torch.stack(torch.meshgrid(torch.arange(1), torch.arange(5), torch.arange(8), indexing="ij"), -1)
    return dict(hidden_states=torch.randn(B, FLUX_IMAGE_TOKENS, 16, generator=g), encoder_hidden_states=text,
                pooled_projections=pooled, timestep=torch.tensor([0.5, 0.8]),
                img_ids=ids.reshape(-1, 3)[:FLUX_IMAGE_TOKENS].float(), txt_ids=torch.zeros(T, 3))


@contextlib.contextmanager
def capture_qk(model, kind, layers):
    """Record the q, k that diffusers' stock processors pass to their attention function in the given blocks."""
    import diffusers.models.transformers.transformer_flux as flux_mod

    captured, current = {}, []
    hooks = []
    for i in layers:
        attn = model.transformer_blocks[i].attn
        hooks.append(attn.register_forward_pre_hook(lambda m, a, i=i: current.append(i)))
        hooks.append(attn.register_forward_hook(lambda m, a, o: current.clear()))  # returns None: output kept
    if kind == "sd3":
        real = F.scaled_dot_product_attention

        def recording(q, k, v, *a, **kw):
            if current:
                captured[current[-1]] = (q.detach().clone(), k.detach().clone())
            return real(q, k, v, *a, **kw)

        patch = (torch.nn.functional, "scaled_dot_product_attention", recording)
    else:
        real = flux_mod.dispatch_attention_fn

        def recording(q, k, v, *a, **kw):
            if current:
                captured[current[-1]] = (q.detach().clone(), k.detach().clone())
            return real(q, k, v, *a, **kw)

        patch = (flux_mod, "dispatch_attention_fn", recording)
    mp = pytest.MonkeyPatch()
    mp.setattr(*patch)
    try:
        yield captured
    finally:
        mp.undo()
        for h in hooks:
            h.remove()


def eager_entropy_bits(captured, kind, mode):
    """AEGPO eq. 1-4 in float64 from materialised maps of the captured q, k."""
    layout = "bhsd" if kind == "sd3" else "bshd"
    blocks = []
    for q, k in captured.values():
        qh, kh = (t.double() if layout == "bhsd" else t.double().transpose(1, 2) for t in (q, k))
        P = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1]), dim=-1)  # [B, H, S, S]
        n_image = P.shape[-1] - T
        image, text = (slice(0, n_image), slice(n_image, None)) if kind == "sd3" else \
            (slice(T, None), slice(0, T))
        blocks.append(P[:, :, image, text])  # image queries x text keys
    A = torch.stack(blocks)  # [layers, B, H, N, T]
    if mode == "mixture":
        prob = A.mean(dim=(0, 2))
        prob = prob / prob.sum(-1, keepdim=True)
        return -(torch.special.xlogy(prob, prob) / math.log(2)).sum(-1).mean(-1)
    prob = A / A.sum(-1, keepdim=True)
    return -(torch.special.xlogy(prob, prob) / math.log(2)).sum(-1).mean(dim=(0, 2, 3))


def _processors(model):
    return {name: proc for name, proc in model.attn_processors.items()}


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["mixture", "head_mean"])
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_collector_matches_eager_and_keeps_outputs(kind, mode, impl, device):
    model = _model(kind).to(device)
    inputs = {k: t.to(device) for k, t in _inputs(kind).items()}
    layers = LAYERS[kind]
    before = _processors(model)
    with torch.no_grad(), capture_qk(model, kind, layers) as captured:
        plain = model(**inputs).sample
    assert sorted(captured) == sorted(layers)
    want = eager_entropy_bits(captured, kind, mode)

    with torch.no_grad(), AttentionEntropyCollector(model, layers=layers, mode=mode, impl=impl) as collector:
        during = _processors(model)
        out = model(**inputs).sample
        got = collector.pop()
    assert got.shape == (B,) and got.dtype == torch.float32
    assert_close(got, want, name=f"Entropy(t) {kind}/{mode}")
    assert_close(out, plain.double(), name="model output with the collector")
    # Only the selected joint attentions were replaced (SD3.5's attn2 and every other block kept theirs) ...
    changed = {name for name in before if during[name] is not before[name]}
    prefix = "transformer_blocks.{}.attn.processor"
    assert changed == {prefix.format(i) for i in layers}
    # ... and all of them are back, as the very same objects, on exit.
    after = _processors(model)
    assert all(after[name] is before[name] for name in before)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_collector_with_peft_lora_adapter(kind):
    from peft import LoraConfig

    model = _model(kind)
    targets = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"]
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; a non-zero B makes the adapter change q and k
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    inputs, layers = _inputs(kind, seed=2), LAYERS[kind]
    with torch.no_grad(), capture_qk(model, kind, layers) as captured:
        plain = model(**inputs).sample
    with torch.no_grad(), AttentionEntropyCollector(model, layers=layers, impl="torch") as collector:
        out = model(**inputs).sample
        got = collector.pop()
    assert_close(got, eager_entropy_bits(captured, kind, "mixture"), name="Entropy(t) with LoRA")
    assert_close(out, plain.double(), name="output with LoRA")
    # The adapter matters: disabling it changes the entropy the collector reports.
    model.disable_adapters()
    with torch.no_grad(), AttentionEntropyCollector(model, layers=layers, impl="torch") as collector:
        model(**inputs)
        without = collector.pop()
    assert (without - got).abs().max() > 1e-3


def test_pop_is_first_in_first_out_and_training_pass_keeps_gradients():
    model = _model("flux")
    a, b = _inputs("flux", seed=3), _inputs("flux", seed=4)
    with AttentionEntropyCollector(model, layers=(1,), impl="torch") as collector:
        with torch.no_grad():
            model(**a)
            model(**b)
        first, second = collector.pop(), collector.pop()
        with pytest.raises(RuntimeError, match="no transformer forward recorded"):
            collector.pop()
        # Training pass: the block output stays differentiable (SDPA), the entropy is still recorded.
        x = a["hidden_states"].clone().requires_grad_(True)
        out = model(**{**a, "hidden_states": x}).sample
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        assert_close(collector.pop(), first.double())
    with torch.no_grad():
        again = AttentionEntropyCollector(model, layers=(1,), impl="torch")
        with again:
            model(**b)
        assert torch.equal(again.pop(), second)
    x = a["hidden_states"].clone().requires_grad_(True)
    (plain_grad,) = torch.autograd.grad(model(**{**a, "hidden_states": x}).sample.square().sum(), x)
    assert_close(grad, plain_grad.double(), name="input gradient through the collector's processors")


@pytest.mark.parametrize("kwargs, match", [
    (dict(layers=(0, 4)), r"layers \[4\] do not exist: the transformer has 4 joint blocks"),
    (dict(layers=(-1,)), r"layers \[-1\] do not exist"),
    (dict(layers=()), "layers must be a non-empty sequence"),
    (dict(layers=(1, 1)), "distinct"),
    (dict(layers=3), "layers must be a sequence"),
    (dict(mode="mean"), "mode must be one of"),
    (dict(impl="cuda"), "impl must be one of"),
])
def test_collector_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionEntropyCollector(_model("sd3"), **kwargs)


def test_collector_rejects_other_modules_and_processors():
    with pytest.raises(ValueError, match="transformer must be a diffusers"):
        AttentionEntropyCollector(torch.nn.Linear(2, 2), layers=(0,))
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = _model("sd3")
    model.transformer_blocks[1].attn.set_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match=r"layers: transformer_blocks\[1\].attn uses AttnProcessor2_0"):
        AttentionEntropyCollector(model, layers=(1,))


def test_compiled_blocks_of_the_selected_layers_run_eagerly_inside():
    """Blocks compiled in place (``model.compile``): inside the collector the blocks holding a selected layer have
    their compiled call set aside (the processors are not traced), the others keep theirs; on exit, even after an
    error, every block has its own compiled call back (nothing is traced here: compilation is lazy)."""
    model = _model("flux")
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    for b in blocks:
        b.compile(backend="eager")
    calls = [b._compiled_call_impl for b in blocks]
    with AttentionEntropyCollector(model, layers=(0, 2)):
        assert [b._compiled_call_impl is None for b in blocks] == [True, False, True, False]
    assert all(b._compiled_call_impl is c for b, c in zip(blocks, calls))
    with pytest.raises(KeyError), AttentionEntropyCollector(model, layers=(1,)):
        assert model.transformer_blocks[1]._compiled_call_impl is None
        raise KeyError("boom")
    assert all(b._compiled_call_impl is c for b, c in zip(blocks, calls))



def _named_chain(root, target):
    """Reference for `_paths_to`: the modules from ``root`` to ``target`` along ``target``'s dotted name."""
    name = {id(m): n for n, m in root.named_modules()}[id(target)]
    parts = name.split(".") if name else []
    return [root.get_submodule(".".join(parts[:k])) for k in range(len(parts) + 1)]


@pytest.mark.parametrize("wrap", ["plain", "peft_model"])
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_paths_to_selected_layers_match_named_modules(kind, wrap):
    """The constructor's walk (`_paths_to`, breadth-first, stops at the last target, builds no names) finds the
    same module chains as the dotted names of ``named_modules``: every selected layer, through a peft wrapper too;
    the root itself when it is a target; nothing for a module outside the model."""
    from fastgrpo.diffusion.attention import _paths_to

    model = _model(kind)
    root = model
    if wrap == "peft_model":
        from peft import LoraConfig, get_peft_model

        root = get_peft_model(model, LoraConfig(r=2, target_modules=["to_q", "to_k"]))
    attns = [b.attn for b in model.transformer_blocks]
    stranger = torch.nn.Linear(2, 2)
    paths = _paths_to(root, [attns[-1], attns[0], stranger, root])
    assert set(paths) == {id(attns[-1]), id(attns[0]), id(root)}
    for t in (attns[0], attns[-1]):
        assert [id(m) for m in paths[id(t)]] == [id(m) for m in _named_chain(root, t)]
    assert paths[id(root)] == [root]
    assert _paths_to(root, [stranger]) == {}


def test_collector_constructor_does_not_walk_the_whole_model(monkeypatch):
    """Constructing a collector (which the benchmark does per forward) takes no ``named_modules`` walk over the
    model; only the error message for a replaced processor builds names."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = _model("sd3")

    def walk(*a, **kw):
        raise AssertionError("named_modules walked")

    with monkeypatch.context() as m:
        m.setattr(torch.nn.Module, "named_modules", walk)
        collector = AttentionEntropyCollector(model, layers=(1, 3))
    assert {id(model), id(model.transformer_blocks), id(model.transformer_blocks[3])} <= {
        id(m) for m in collector._ancestors}
    assert id(model.transformer_blocks[2]) not in {id(m) for m in collector._ancestors}
    model.transformer_blocks[3].attn.set_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match=r"transformer_blocks\[3\].attn uses AttnProcessor2_0"):
        AttentionEntropyCollector(model, layers=(1, 3))


def test_whole_transformer_compiled_in_place_runs_eagerly_inside():
    """``transformer.compile()`` (the whole model compiled in place, not its blocks) is set aside inside the
    collector too, also through a peft wrapper, and put back on exit."""
    from peft import LoraConfig, get_peft_model

    for wrapped in (False, True):
        model = _model("sd3")
        model.compile(backend="eager")
        root = get_peft_model(model, LoraConfig(r=2, target_modules=["to_q"])) if wrapped else model
        compiled = model._compiled_call_impl
        with AttentionEntropyCollector(root, layers=(2,)):
            assert model._compiled_call_impl is None
        assert model._compiled_call_impl is compiled

def test_flux_attention_mask_is_rejected():
    model = _model("flux")
    inputs = _inputs("flux")
    S = T + FLUX_IMAGE_TOKENS
    mask = torch.ones(B, 1, S, S, dtype=torch.bool)
    with torch.no_grad(), AttentionEntropyCollector(model, layers=(0,), impl="torch"):
        with pytest.raises(ValueError, match="attention_mask is not supported"):
            model(**inputs, joint_attention_kwargs={"attention_mask": mask})
    assert type(model.transformer_blocks[0].attn.processor).__name__ == "FluxAttnProcessor"


# ----------------------------------------------------------------------------------------------- host cost

# What the collector may add to a forward on the host (the SD3.5-Medium forward at batch 2 is host-bound, so every
# added op or launch shows in its time, and a device sync drains the queue). Counted on CPU with the Triton kernels
# stubbed out (their launches counted instead, the interpreter's own tensor ops kept out of the count).
MAX_EXTRA_OPS_PER_LAYER = 0  # +1 output allocation, -1 SDPA (its transpose and view replace SDPA's reshape)
MAX_EXTRA_OPS_PER_FORWARD = 11  # statistics + [B, N, T] buffers, Entropy(t) from the buffer (~8 small ops)
LAUNCHES_PER_LAYER = {"mixture": 2, "head_mean": 1}
SYNC_OPS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.nonzero", "aten.equal",
            "aten._assert_async", "aten.masked_select", "aten.unique", "aten._unique2"}


class _CountOps:
    def __init__(self):
        import collections

        from torch.utils._python_dispatch import TorchDispatchMode

        ops = self.ops = collections.Counter()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                ops[str(func.overloadpacket)] += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self.ops

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


@pytest.mark.parametrize("mode", ["mixture", "head_mean"])
def test_collector_host_ops_and_launches_per_layer(mode, monkeypatch):
    import collections

    import fastgrpo.kernels.attention_entropy as kernels

    launches = collections.Counter()

    class Stub:  # `kernel[grid](...)` counts instead of running the interpreter
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **kw: launches.update([self.name])

    monkeypatch.setattr(kernels, "attention_text_entropy_fwd_kernel", Stub("attention"))
    monkeypatch.setattr(kernels, "text_probs_kernel", Stub("probs"))
    model = _model("sd3")
    inputs = _inputs("sd3")
    with torch.no_grad():
        with _CountOps() as plain:
            model(**inputs)
        extra = {}
        for layers in [(1,), (0, 1, 2, 3)]:
            with AttentionEntropyCollector(model, layers=layers, mode=mode, impl="triton") as collector:
                model(**inputs)  # the first forward builds the plan (validation) once
                collector.pop()
                launches.clear()
                with _CountOps() as ops:
                    model(**inputs)
                    collector.pop()
            assert (launches["attention"], launches["probs"]) == (len(layers), len(layers) * (mode == "mixture"))
            synced = {op: n for op, n in ops.items() if op in SYNC_OPS and n > plain[op]}
            assert not synced, f"the collector's forward runs ops that sync a device: {synced}"
            extra[len(layers)] = sum(ops.values()) - sum(plain.values())
    per_layer = (extra[4] - extra[1]) / 3
    per_forward = extra[1] - per_layer
    assert per_layer <= MAX_EXTRA_OPS_PER_LAYER, (per_layer, extra)
    assert per_forward <= MAX_EXTRA_OPS_PER_FORWARD, (per_forward, extra)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device syncs are checked on CUDA only "
                    "(torch.cuda.set_sync_debug_mode); on CPU, test_collector_host_ops_and_launches_per_layer "
                    "checks that no syncing op runs")
@pytest.mark.parametrize("mode", ["mixture", "head_mean"])
def test_collector_forward_does_not_sync_cuda(mode):
    model = tiny_sd3_transformer(num_layers=4, dual_attention_layers=(0, 1)).to("cuda", torch.bfloat16)
    inputs = {k: t.to("cuda", torch.bfloat16 if t.is_floating_point() and k != "timestep" else t.dtype)
              for k, t in _inputs("sd3").items()}

    syncs = cuda_syncs
    with torch.no_grad():
        model(**inputs)
        torch.cuda.synchronize()
        plain_syncs = syncs(lambda: model(**inputs))  # diffusers' own forward, for comparison (expected: none)
    with torch.no_grad(), AttentionEntropyCollector(model, layers=(1, 3), mode=mode) as collector:
        model(**inputs)  # compiles the kernels, builds the plan
        collector.pop()
        torch.cuda.synchronize()
        results = []
        collector_syncs = syncs(lambda: (model(**inputs), results.append(collector.pop())))
    assert len(collector_syncs) == len(plain_syncs), collector_syncs
    assert results[0].shape == (B,) and torch.isfinite(results[0]).all()
    if not plain_syncs:
        with torch.no_grad(), AttentionEntropyCollector(model, layers=(1, 3), mode=mode) as collector:
            model(**inputs)
            torch.cuda.set_sync_debug_mode("error")
            try:
                model(**inputs)
                collector.pop()
            finally:
                torch.cuda.set_sync_debug_mode(0)
