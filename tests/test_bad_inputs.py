"""Bad inputs to every public op, under every impl it has: each raises ValueError naming the offending argument.

One table: wrong dtypes, wrong ranks, mismatched shapes, tensors on another device ("meta" next to CPU tensors),
empty tensors where an op needs elements, NaN/inf where not allowed, out-of-range targets, k and text ranges.
Each case is ``(op, impls, call, match)``: ``call(impl)`` calls the op with one bad argument (the others valid)
and ``match`` is a regex the message must match, beginning with the argument's name.
"""
import pytest
import torch

from fastgrpo.ops import (attention_with_text_entropy, eg_grpo_shaping, eg_token_advantages, eg_token_masks,
                          group_advantages, grpo_token_loss, ovf_select, sde_step, text_attention_probs,
                          text_entropy_from_probs, token_logprob_entropy, tree_advantages)

NAN, INF = float("nan"), float("inf")
ALL = ("torch", "cpp", "triton")
TORCH_TRITON = ("torch", "triton")
NONE = (None,)  # ops without impl=
META = torch.device("meta")


def f(*shape, dtype=torch.float32, fill=None, device="cpu"):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32).to(dtype) \
        if dtype.is_floating_point else torch.zeros(*shape, dtype=dtype)
    if fill is not None:
        t = torch.full(shape, fill, dtype=dtype)
    return t.to(device)


def i64(*shape, fill=0, device="cpu"):
    return torch.full(shape, fill, dtype=torch.int64, device=device)


# ----------------------------------------------------------------------------------------------- sde_step


def sde(impl, *, x=None, v=None, sigma=0.8, sigma_next=0.6, **kw):
    x = f(3, 5) if x is None else x
    v = f(*x.shape) if v is None else v
    return sde_step(x, v, sigma, sigma_next, impl=impl, **kw)


SDE = [
    ("x int", lambda i: sde(i, x=i64(3, 5), v=f(3, 5)), r"^x must be a floating tensor"),
    ("v int", lambda i: sde(i, v=i64(3, 5)), r"^v must be a floating tensor"),
    ("x rank 1", lambda i: sde(i, x=f(5)), r"^x must have shape \[B, \.\.\.\]"),
    ("v shape", lambda i: sde(i, v=f(3, 7)), r"^v must have the shape of x"),
    ("noise shape", lambda i: sde(i, noise=f(3, 4)), r"^noise must have the shape of x"),
    ("prev_sample dtype", lambda i: sde(i, prev_sample=i64(3, 5)), r"^prev_sample must be a floating tensor"),
    ("v_ref shape", lambda i: sde(i, v_ref=f(3)), r"^v_ref must have the shape of x"),
    ("v_ref meta", lambda i: sde(i, v_ref=f(3, 5, device=META)), r"^v_ref is on meta"),
    ("noise meta", lambda i: sde(i, noise=f(3, 5, device=META)), r"^noise is on meta"),
    ("x empty sample", lambda i: sde(i, x=f(3, 0)), r"^x must have at least one element per sample"),
    ("sigma nan", lambda i: sde(i, sigma=NAN), r"^sigma and sigma_next must lie in"),
    ("sigma inf", lambda i: sde(i, sigma=INF), r"^sigma and sigma_next must lie in"),
    ("sigma_next nan", lambda i: sde(i, sigma_next=NAN), r"^sigma and sigma_next must lie in"),
    ("sigma_next -inf", lambda i: sde(i, sigma_next=-INF), r"^sigma and sigma_next must lie in"),
    ("sigma tensor nan", lambda i: sde(i, sigma=torch.tensor([0.8, NAN, 0.8], dtype=torch.float64)),
     r"^sigma and sigma_next must lie in"),
    ("sigma int tensor", lambda i: sde(i, sigma=torch.ones(3, dtype=torch.int64)), r"^sigma must be a float"),
    ("sigma shape", lambda i: sde(i, sigma=torch.full((2,), 0.8)), r"^sigma must be a float or a tensor of shape"),
    ("sigma meta", lambda i: sde(i, sigma=torch.full((3,), 0.8, device=META)), r"^sigma is on meta"),
    ("sigma_next > sigma", lambda i: sde(i, sigma=0.5, sigma_next=0.6), r"^sigma_next must be smaller than sigma"),
    ("sigma > 1", lambda i: sde(i, sigma=1.5), r"^sigma and sigma_next must lie in"),
    ("sigma 1 without sigma_max", lambda i: sde(i, sigma=1.0), r"^sigma == 1 .* needs sigma_max"),
    ("sigma_max nan", lambda i: sde(i, sigma=1.0, sigma_max=NAN), r"^sigma_max must be in \(0, 1\)"),
    ("noise_level nan", lambda i: sde(i, noise_level=NAN), r"^noise_level must be a finite float"),
    ("noise_level inf", lambda i: sde(i, noise_level=INF), r"^noise_level must be a finite float"),
    ("noise_level 0 flow_grpo", lambda i: sde(i, noise_level=0.0), r"^noise_level must be > 0"),
    ("noise_level cps > 1", lambda i: sde(i, kind="cps", noise_level=1.5), r"^noise_level must be in \[0, 1\]"),
    ("kind", lambda i: sde(i, kind="ddim"), r"^kind must be one of"),
    ("kl_convention", lambda i: sde(i, kl_convention="kl1"), r"^kl_convention must be one of"),
    ("generator", lambda i: sde(i, generator=0), r"^generator must be a torch.Generator"),
]

# ------------------------------------------------------------------------------------- token_logprob_entropy


def tok(impl, *, logits=None, targets=None, **kw):
    logits = f(2, 3, 5) if logits is None else logits
    targets = i64(*logits.shape[:-1]) if targets is None else targets
    return token_logprob_entropy(logits, targets, impl=impl, **kw)


TOKEN = [
    ("logits int", lambda i: tok(i, logits=i64(2, 3, 5)), r"^logits must be a floating tensor"),
    ("targets float", lambda i: tok(i, targets=f(2, 3)), r"^targets must be an integer"),
    ("targets bool", lambda i: tok(i, targets=torch.zeros(2, 3, dtype=torch.bool)), r"^targets must be an integer"),
    ("logits rank 0", lambda i: tok(i, logits=f(), targets=i64()), r"^logits must have shape \[\.\.\., V\]"),
    ("targets shape", lambda i: tok(i, targets=i64(2, 4)), r"^targets must have shape"),
    ("targets rank", lambda i: tok(i, targets=i64(6)), r"^targets must have shape"),
    ("targets meta", lambda i: tok(i, targets=i64(2, 3, device=META)), r"^targets is on meta"),
    ("logits empty vocabulary", lambda i: tok(i, logits=f(2, 3, 0)), r"^logits must have shape \[\.\.\., V\] with V"),
    ("targets >= V", lambda i: tok(i, targets=i64(2, 3, fill=5)), r"^targets must lie in \[0, 5\)"),
    ("targets negative", lambda i: tok(i, targets=i64(2, 3, fill=-1)), r"^targets must lie in \[0, 5\)"),
    ("temperature nan", lambda i: tok(i, temperature=NAN), r"^temperature must be a float in"),
    ("temperature inf", lambda i: tok(i, temperature=INF), r"^temperature must be a float in"),
    ("temperature 0", lambda i: tok(i, temperature=0.0), r"^temperature must be a float in"),
    ("ignore_index float", lambda i: tok(i, ignore_index=-100.0), r"^ignore_index must be an int"),
]

# ------------------------------------------------------------------------------------------------- EG-GRPO


def shaping(impl, *, logits=None, targets=None, modality=None, advantages=None, **kw):
    logits = f(2, 3, 5) if logits is None else logits
    targets = i64(2, 3) if targets is None else targets
    modality = i64(2, 3) if modality is None else modality
    advantages = f(2) if advantages is None else advantages
    return eg_grpo_shaping(logits, targets, modality, advantages, impl=impl, **kw)


SHAPING = [
    ("logits int", lambda i: shaping(i, logits=i64(2, 3, 5)), r"^logits must be a floating tensor"),
    ("logits rank 2", lambda i: shaping(i, logits=f(2, 5)), r"^logits must have shape \[B, L, V\]"),
    ("logits empty vocabulary", lambda i: shaping(i, logits=f(2, 3, 0)), r"^logits must have shape"),
    ("targets float", lambda i: shaping(i, targets=f(2, 3)), r"^targets must be an integer"),
    ("targets shape", lambda i: shaping(i, targets=i64(2, 4)), r"^targets must have shape"),
    ("targets >= V", lambda i: shaping(i, targets=i64(2, 3, fill=5)), r"^targets must lie in \[0, 5\)"),
    ("targets negative", lambda i: shaping(i, targets=i64(2, 3, fill=-2)), r"^targets must lie in \[0, 5\)"),
    ("targets meta", lambda i: shaping(i, targets=i64(2, 3, device=META)), r"^targets is on meta"),
    ("modality float", lambda i: shaping(i, modality=f(2, 3)), r"^modality must be an integer tensor"),
    ("modality shape", lambda i: shaping(i, modality=i64(3, 2)), r"^modality must have shape"),
    ("modality value", lambda i: shaping(i, modality=i64(2, 3, fill=2)), r"^modality must hold only"),
    ("modality meta", lambda i: shaping(i, modality=i64(2, 3, device=META)), r"^modality is on meta"),
    ("advantages int", lambda i: shaping(i, advantages=i64(2)), r"^advantages must be a floating tensor"),
    ("advantages shape", lambda i: shaping(i, advantages=f(3)), r"^advantages must have shape \[B\]"),
    ("advantages meta", lambda i: shaping(i, advantages=f(2, device=META)), r"^advantages is on meta"),
    ("temperature nan", lambda i: shaping(i, temperature=NAN), r"^temperature must be a float in"),
    ("low_frac nan", lambda i: shaping(i, low_frac=NAN), r"^low_frac must be a float in \(0, 1\)"),
    ("high_frac 1", lambda i: shaping(i, high_frac=1.0), r"^high_frac must be a float in \(0, 1\)"),
    ("bonus inf", lambda i: shaping(i, bonus=INF), r"^bonus must be a finite float"),
    ("bonus nan", lambda i: shaping(i, bonus=NAN), r"^bonus must be a finite float"),
    ("rule", lambda i: shaping(i, rule="median"), r"^rule must be one of"),
]

MASKS = [
    ("entropy int", lambda i: eg_token_masks(i64(2, 3), i64(2, 3), impl=i), r"^entropy must be a floating tensor"),
    ("entropy rank 1", lambda i: eg_token_masks(f(3), i64(3), impl=i), r"^entropy must have shape \[B, L\]"),
    ("modality shape", lambda i: eg_token_masks(f(2, 3), i64(2, 4), impl=i), r"^modality must have shape"),
    ("modality float", lambda i: eg_token_masks(f(2, 3), f(2, 3), impl=i), r"^modality must be an integer"),
    ("modality value", lambda i: eg_token_masks(f(2, 3), i64(2, 3, fill=-2), impl=i), r"^modality must hold only"),
    ("modality meta", lambda i: eg_token_masks(f(2, 3), i64(2, 3, device=META), impl=i), r"^modality is on meta"),
    ("low_frac inf", lambda i: eg_token_masks(f(2, 3), i64(2, 3), low_frac=INF, impl=i), r"^low_frac must be"),
]

ADV = [
    ("advantages int", lambda i: eg_token_advantages(i64(2), f(2, 3), *bools(2, 3)),
     r"^advantages must be a floating tensor"),
    ("advantages shape", lambda i: eg_token_advantages(f(3), f(2, 3), *bools(2, 3)),
     r"^advantages must have shape \[B\]"),
    ("entropy rank", lambda i: eg_token_advantages(f(2), f(2, 3, 1), *bools(2, 3)),
     r"^entropy must have shape \[B, L\]"),
    ("low int", lambda i: eg_token_advantages(f(2), f(2, 3), i64(2, 3), bools(2, 3)[1]), r"^low must be a bool"),
    ("high shape", lambda i: eg_token_advantages(f(2), f(2, 3), bools(2, 3)[0], bools(2, 4)[1]),
     r"^high must have the shape of entropy"),
    ("high meta", lambda i: eg_token_advantages(f(2), f(2, 3), bools(2, 3)[0], bools(2, 3, device=META)[1]),
     r"^high is on meta"),
    ("bonus nan", lambda i: eg_token_advantages(f(2), f(2, 3), *bools(2, 3), bonus=NAN), r"^bonus must be"),
]


def bools(*shape, device="cpu"):
    return torch.zeros(shape, dtype=torch.bool, device=device), torch.ones(shape, dtype=torch.bool, device=device)


# ----------------------------------------------------------------------------------------------- attention


def attn(impl, *, q=None, k=None, v=None, text_start=4, text_len=3, **kw):
    q = f(1, 2, 9, 8) if q is None else q
    k = f(*q.shape, dtype=q.dtype) if k is None else k
    v = f(*q.shape, dtype=q.dtype) if v is None else v
    return attention_with_text_entropy(q, k, v, text_start=text_start, text_len=text_len, impl=impl, **kw)


ATTENTION = [
    ("q int", lambda i: attn(i, q=i64(1, 2, 9, 8)), r"^q must be a floating tensor"),
    ("q rank 3", lambda i: attn(i, q=f(2, 9, 8)), r"^q must have 4 dims"),
    ("k shape", lambda i: attn(i, k=f(1, 2, 9, 4)), r"^k must have the shape of q"),
    ("v dtype", lambda i: attn(i, v=f(1, 2, 9, 8, dtype=torch.float16)), r"^v must have the dtype of q"),
    ("v int", lambda i: attn(i, v=i64(1, 2, 9, 8)), r"^v must be a floating tensor"),
    ("v meta", lambda i: attn(i, v=f(1, 2, 9, 8, device=META)), r"^v is on meta"),
    ("q empty head dim", lambda i: attn(i, q=f(1, 2, 9, 0)), r"^q must have a head dim >= 1"),
    ("text_start >= S", lambda i: attn(i, text_start=9, text_len=1), r"^text_start must be in \[0, 8\]"),
    ("text_start negative", lambda i: attn(i, text_start=-1), r"^text_start must be in"),
    ("text_len 0", lambda i: attn(i, text_len=0), r"^text_len must be in \[1, 5\]"),
    ("text_len past S", lambda i: attn(i, text_len=6), r"^text_len must be in \[1, 5\]"),
    ("text_start float", lambda i: attn(i, text_start=4.0), r"^text_start must be an int"),
    ("scale nan", lambda i: attn(i, scale=NAN), r"^scale must be a positive float"),
    ("scale inf", lambda i: attn(i, scale=INF), r"^scale must be a positive float"),
    ("layout", lambda i: attn(i, layout="sbhd"), r"^layout must be one of"),
]


def probs(impl, *, q=None, k=None, lse=None, text_start=4, text_len=3, query_start=0, query_len=4, **kw):
    q = f(1, 2, 9, 8) if q is None else q
    k = f(*q.shape) if k is None else k
    lse = f(1, 2, 9) if lse is None else lse
    return text_attention_probs(q, k, lse, text_start=text_start, text_len=text_len, query_start=query_start,
                                query_len=query_len, impl=impl, **kw)


PROBS = [
    ("q int", lambda i: probs(i, q=i64(1, 2, 9, 8)), r"^q must be a floating tensor"),
    ("k shape", lambda i: probs(i, k=f(1, 2, 8, 8)), r"^k must have the shape of q"),
    ("lse dtype", lambda i: probs(i, lse=f(1, 2, 9, dtype=torch.float64)), r"^lse must be a float32 tensor"),
    ("lse shape", lambda i: probs(i, lse=f(1, 2, 8)), r"^lse must be a float32 tensor"),
    ("lse meta", lambda i: probs(i, lse=f(1, 2, 9, device=META)), r"^lse is on meta"),
    ("text_len 0", lambda i: probs(i, text_len=0), r"^text_len must be in"),
    ("text_start >= S", lambda i: probs(i, text_start=9, text_len=1), r"^text_start must be in"),
    ("query_start past S", lambda i: probs(i, query_start=10, query_len=0), r"^query_start must be in \[0, 9\]"),
    ("query_len past S", lambda i: probs(i, query_start=5, query_len=5), r"^query_len must be in \[0, 4\]"),
    ("out shape", lambda i: probs(i, out=f(1, 4, 2)), r"^out must be a float32 tensor"),
    ("out dtype", lambda i: probs(i, out=f(1, 4, 3, dtype=torch.float64)), r"^out must be a float32 tensor"),
    ("out meta", lambda i: probs(i, out=f(1, 4, 3, device=META)), r"^out is on meta"),
    ("scale nan", lambda i: probs(i, scale=NAN), r"^scale must be a positive float"),
]

ENTROPY_FROM_PROBS = [
    ("probs_sum rank 2", lambda i: text_entropy_from_probs(f(2, 3).abs()), r"^probs_sum must be a floating tensor"),
    ("probs_sum int", lambda i: text_entropy_from_probs(i64(2, 3, 4)), r"^probs_sum must be a floating tensor"),
    ("probs_sum nan", lambda i: text_entropy_from_probs(f(2, 3, 4, fill=NAN)), r"^probs_sum must hold finite"),
    ("probs_sum inf", lambda i: text_entropy_from_probs(f(2, 3, 4, fill=INF)), r"^probs_sum must hold finite"),
    ("probs_sum negative", lambda i: text_entropy_from_probs(f(2, 3, 4, fill=-1.0)), r"^probs_sum must hold finite"),
]

# ------------------------------------------------------------------------------------------------ ovf_select

OVF = [
    ("rewards int", lambda i: ovf_select(i64(2, 5), 2, impl=i), r"^rewards must be a floating tensor"),
    ("rewards rank 3", lambda i: ovf_select(f(2, 5, 1), 2, impl=i), r"^rewards must have shape \[P, G\]"),
    ("rewards rank 0", lambda i: ovf_select(f(), 1, impl=i), r"^rewards must have shape \[P, G\]"),
    ("rewards nan", lambda i: ovf_select(f(2, 5, fill=NAN), 2, impl=i), r"^rewards contain NaN or infinite"),
    ("rewards inf", lambda i: ovf_select(torch.tensor([[0.0, INF, 1.0]]), 2, impl=i), r"^rewards contain NaN"),
    ("rewards too large", lambda i: ovf_select(f(2, 5, fill=1e30), 2, impl=i), r"^rewards must satisfy \|r\|"),
    ("rewards empty group", lambda i: ovf_select(f(2, 0), 1, impl=i), r"^k must satisfy 1 <= k <= G = 0"),
    ("k > G", lambda i: ovf_select(f(2, 5), 6, impl=i), r"^k must satisfy 1 <= k <= G = 5"),
    ("k 0", lambda i: ovf_select(f(2, 5), 0, impl=i), r"^k must satisfy"),
    ("k float", lambda i: ovf_select(f(2, 5), 2.0, impl=i), r"^k must be a python int"),
    ("k bool", lambda i: ovf_select(f(2, 5), True, impl=i), r"^k must be a python int"),
]

# ---------------------------------------------------------------------------------- group advantages and loss

GROUP = [
    ("rewards int", lambda i: group_advantages(i64(2, 5)), r"^rewards must be a floating tensor"),
    ("rewards rank 4", lambda i: group_advantages(f(2, 5, 1, 1)), r"^rewards must have shape"),
    ("rewards nan", lambda i: group_advantages(f(2, 5, fill=NAN)), r"^rewards contain NaN or infinite"),
    ("rewards inf", lambda i: group_advantages(torch.tensor([[0.0, INF]])), r"^rewards contain NaN or infinite"),
    ("ddof >= G", lambda i: group_advantages(f(2, 1), ddof=1), r"^ddof=1 needs more than 1 rewards"),
    ("ddof negative", lambda i: group_advantages(f(2, 5), ddof=-1), r"^ddof must be an int >= 0"),
    ("eps 0", lambda i: group_advantages(f(2, 5), eps=0.0), r"^eps must be a float > 0"),
    ("eps nan", lambda i: group_advantages(f(2, 5), eps=NAN), r"^eps must be a float > 0"),
    ("clip negative", lambda i: group_advantages(f(2, 5), clip=-1.0), r"^clip must be None or a float > 0"),
    ("clip nan", lambda i: group_advantages(f(2, 5), clip=NAN), r"^clip must be None or a float > 0"),
    ("weights length", lambda i: group_advantages(f(2, 5, 3), weights=[1.0, 2.0]), r"^weights must have one entry"),
    ("weights nan", lambda i: group_advantages(f(2, 5, 2), weights=[1.0, NAN]), r"^weights must be finite"),
    ("weights without R", lambda i: group_advantages(f(2, 5), weights=[1.0]), r"^weights are for several"),
    ("group_sizes sum", lambda i: group_advantages(f(7), group_sizes=[3, 3]), r"^group_sizes sum to 6"),
    ("group_sizes float", lambda i: group_advantages(f(6), group_sizes=[3.0, 3.0]), r"^group_sizes must be"),
    ("group_sizes empty", lambda i: group_advantages(f(0), group_sizes=[]), r"^group_sizes must be"),
    ("group_sizes zero", lambda i: group_advantages(f(3), group_sizes=[3, 0]), r"^group_sizes must all be >= 1"),
    ("group_sizes ddof", lambda i: group_advantages(f(4), group_sizes=[3, 1], ddof=1), r"^ddof=1 needs more"),
    ("group_sizes rewards rank", lambda i: group_advantages(f(2, 2, 1), group_sizes=[2]),
     r"^with group_sizes, rewards must have shape"),
]

TREE = [
    ("leaf_rewards int", lambda i: tree_advantages(i64(2, 4), [2, 2]), r"^leaf_rewards must be a floating tensor"),
    ("leaf_rewards rank 3", lambda i: tree_advantages(f(2, 4, 1), [2, 2]), r"^leaf_rewards must have shape"),
    ("leaf_rewards L", lambda i: tree_advantages(f(2, 5), [2, 2]), r"^leaf_rewards must have L = prod"),
    ("leaf_rewards nan", lambda i: tree_advantages(f(2, 4, fill=NAN), [2, 2]), r"^leaf_rewards contain NaN"),
    ("leaf_rewards inf", lambda i: tree_advantages(torch.tensor([0.0, INF]), [2]), r"^leaf_rewards contain NaN"),
    ("leaf_rewards meta", lambda i: tree_advantages(f(2, 4, device=META), [2, 2]), r"^leaf_rewards is on meta"),
    ("branching empty", lambda i: tree_advantages(f(2, 1), []), r"^branching must be a non-empty sequence"),
    ("branching zero", lambda i: tree_advantages(f(2, 4), [4, 0]), r"^branching must be a non-empty sequence"),
    ("branching negative", lambda i: tree_advantages(f(2, 4), [-2, -2]), r"^branching must be a non-empty"),
    ("branching float", lambda i: tree_advantages(f(2, 4), [2.0, 2]), r"^branching must be a non-empty sequence"),
    ("branching bool", lambda i: tree_advantages(f(2, 4), [True, 4]), r"^branching must be a non-empty sequence"),
    ("branching int", lambda i: tree_advantages(f(2, 4), 4), r"^branching must be a non-empty sequence"),
    ("branching str", lambda i: tree_advantages(f(2, 4), "22"), r"^branching must be a non-empty sequence"),
    ("ddof 2", lambda i: tree_advantages(f(2, 4), [2, 2], ddof=2), r"^ddof must be 0 or 1"),
    ("ddof float", lambda i: tree_advantages(f(2, 4), [2, 2], ddof=0.5), r"^ddof must be 0 or 1"),
    ("eps negative", lambda i: tree_advantages(f(2, 4), [2, 2], eps=-1e-8), r"^eps must be a finite float >= 0"),
    ("eps nan", lambda i: tree_advantages(f(2, 4), [2, 2], eps=NAN), r"^eps must be a finite float >= 0"),
    ("eps inf", lambda i: tree_advantages(f(2, 4), [2, 2], eps=INF), r"^eps must be a finite float >= 0"),
    ("min_std negative", lambda i: tree_advantages(f(2, 4), [2, 2], min_std=-1.0), r"^min_std must be a finite"),
    ("min_std str", lambda i: tree_advantages(f(2, 4), [2, 2], min_std="1e-6"), r"^min_std must be a finite"),
    ("eps and min_std 0", lambda i: tree_advantages(f(2, 4), [2, 2], eps=0.0, min_std=0.0),
     r"^eps and min_std must not both be 0"),
]


def loss(*, logp=None, old_logp="default", ref_logp=None, token_adv=None, mask=None, **kw):
    logp = f(2, 3) if logp is None else logp
    old_logp = f(2, 3) if isinstance(old_logp, str) else old_logp
    token_adv = f(2, 3) if token_adv is None else token_adv
    mask = torch.ones(2, 3, dtype=torch.bool) if mask is None else mask
    return grpo_token_loss(logp, old_logp, ref_logp, token_adv, mask, **kw)


LOSS = [
    ("logp int", lambda i: loss(logp=i64(2, 3)), r"^logp must be a floating tensor"),
    ("old_logp shape", lambda i: loss(old_logp=f(3, 2)), r"^old_logp must have the shape of logp"),
    ("ref_logp int", lambda i: loss(ref_logp=i64(2, 3)), r"^ref_logp must be a floating tensor"),
    ("token_adv shape", lambda i: loss(token_adv=f(2)), r"^token_adv must have the shape of logp"),
    ("token_adv meta", lambda i: loss(token_adv=f(2, 3, device=META)), r"^token_adv is on meta"),
    ("mask int", lambda i: loss(mask=i64(2, 3, fill=1)), r"^mask must be a bool or float tensor"),
    ("mask shape", lambda i: loss(mask=torch.ones(2, 4, dtype=torch.bool)), r"^mask must be a bool or float"),
    ("mask nan", lambda i: loss(mask=f(2, 3, fill=NAN)), r"^mask must hold weights in \[0, 1\]"),
    ("mask > 1", lambda i: loss(mask=f(2, 3, fill=2.0)), r"^mask must hold weights in \[0, 1\]"),
    ("mask meta", lambda i: loss(mask=torch.ones(2, 3, dtype=torch.bool, device=META)), r"^mask is on meta"),
    ("clip_eps 1.5", lambda i: loss(clip_eps=1.5), r"^clip_eps must be None or a float in \(0, 1\)"),
    ("clip_eps nan", lambda i: loss(clip_eps=NAN), r"^clip_eps must be None or a float in \(0, 1\)"),
    ("old_logp None with clip", lambda i: loss(old_logp=None, clip_eps=0.2), r"^old_logp is required"),
    ("beta nan", lambda i: loss(beta=NAN), r"^beta must be a finite float"),
    ("beta inf", lambda i: loss(beta=INF), r"^beta must be a finite float"),
]

# ----------------------------------------------------------------------------------------------- the table

OPS = {
    "sde_step": (ALL, SDE),
    "token_logprob_entropy": (ALL, TOKEN),
    "eg_grpo_shaping": (ALL, SHAPING),
    "eg_token_masks": (ALL, MASKS),
    "eg_token_advantages": (NONE, ADV),
    "attention_with_text_entropy": (TORCH_TRITON, ATTENTION),
    "text_attention_probs": (TORCH_TRITON, PROBS),
    "text_entropy_from_probs": (NONE, ENTROPY_FROM_PROBS),
    "ovf_select": (ALL, OVF),
    "group_advantages": (NONE, GROUP),
    "tree_advantages": (NONE, TREE),
    "grpo_token_loss": (NONE, LOSS),
}
CASES = [pytest.param(call, impl, match, id=f"{op}-{name}" + (f"-{impl}" if impl else ""))
         for op, (impls, cases) in OPS.items() for name, call, match in cases for impl in impls]


@pytest.mark.parametrize("call, impl, match", CASES)
def test_bad_input_raises_value_error_naming_the_argument(call, impl, match):
    if impl == "cpp":
        from fastgrpo import _ext

        if not _ext.available():
            pytest.skip(f"the C++ extension fastgrpo._C is not usable: {_ext.failure_reason()}")
    with pytest.raises(ValueError, match=match):
        call(impl)
