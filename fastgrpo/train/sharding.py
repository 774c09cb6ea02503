"""Where the trainable weights live across processes: replicated (DDP) or sharded (FSDP2).

``distributed.strategy`` chooses:

* ``ddp`` -- every process holds all weights, the optimizer state and the EMA; after a step's local gradient
  accumulation the gradients are averaged over processes (`fastgrpo.train.distributed.average_gradients`, the mean
  DDP's all-reduce computes), so every replica takes the same optimizer step. LoRA or full fine-tuning, any family.
* ``fsdp`` -- full fine-tuning (``model.lora: null``) of the flow families (tested on SD3) with FSDP2
  (``torch.distributed.fsdp.fully_shard``). Every transformer block is one FSDP unit (the classes the family
  adapter names, `FlowAdapter.fsdp_block_classes`: by default the model's ``_no_split_modules``, SD3's
  ``JointTransformerBlock``, FLUX's double- and single-stream blocks -- the units accelerate's
  TRANSFORMER_BASED_WRAP picks by default) and the rest of the transformer is the root unit. Each of N
  processes keeps a 1/N dim-0 shard of every weight (a DTensor); FSDP all-gathers a block's weights for its forward
  and reduce-scatters its gradients during backward (the mean over processes), so gradients, AdamW's moments and
  the EMA are sharded as well. The frozen reference copy for the KL (`fastgrpo.reference`) is sharded the same way.
* ``auto`` (default) -- ``fsdp`` when ``accelerate launch`` was given an FSDP config (``distributed_type: FSDP``,
  e.g. ``configs/accelerate/fsdp.yaml``), else ``ddp``.

Why FSDP2 directly and not ``Accelerator.prepare``: the loop owns its optimizer step, gradient accumulation and
checkpoint format (one format for every strategy) and must gather the policy's weights for sampling; ``prepare``
would wrap the optimizer and take over state saving, and its FSDP2 path is shaped around transformers language
models (it carves input embeddings, final norm and lm_head into units of their own). The units here are the ones
accelerate picks for the transformer blocks. Of an accelerate FSDP config fastgrpo reads ``distributed_type`` and
``fsdp_reshard_after_forward`` (false keeps each block's gathered weights from forward to backward, ZeRO-2 style);
FSDP version, wrap policy and state-dict type are fixed (FSDP2, per block, full state dicts); what it does not
implement (parameter offload, activation checkpointing, CPU-RAM-efficient loading) raises ValueError instead of
being ignored. accelerate's ``mixed_precision`` is not used: precision is ``model.dtype``, as under DDP.

**Sampling** is no-grad forwards whose number can differ between processes (TempFlow-GRPO's branch step sets how
many rows a forward has), while FSDP's per-forward all-gathers need every process to run the same forwards. So the
sample phase gathers the policy's blocks once, samples without collectives, and reshards afterwards: while sampling
each process holds the whole transformer, as under DDP; gradients, optimizer state, EMA and reference stay sharded
throughout. **Training** runs FSDP's per-block all-gather and reduce-scatter, so every process must run the same
number of training forwards: every built-in variant except AEGPO trains the same number of transitions per
process (AEGPO's groups differ in size, and its reference probes depend on each process's cache: it is refused
with FSDP), and a mismatch raises ValueError instead of hanging.

**Checkpoints** hold full (gathered) tensors in the same files as DDP and single-process runs
(`fastgrpo.train.checkpoint`): every process takes part in gathering, rank 0 writes; on resume every process reads
the files and keeps its own shard. With one process there is nothing to shard and ``fsdp`` runs as ``ddp`` does.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .distributed import all_gather_cat, average_gradients

# accelerate FSDP settings fastgrpo does not implement: the env variable `accelerate launch` sets -> the config key.
_UNSUPPORTED_ACCELERATE_FSDP = {"FSDP_OFFLOAD_PARAMS": "fsdp_offload_params",
                                "FSDP_ACTIVATION_CHECKPOINTING": "fsdp_activation_checkpointing",
                                "FSDP_CPU_RAM_EFFICIENT_LOADING": "fsdp_cpu_ram_efficient_loading"}


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def launched_with_fsdp() -> bool:
    """True under ``accelerate launch`` with an FSDP config (it sets ACCELERATE_USE_FSDP)."""
    return _env_true("ACCELERATE_USE_FSDP")


def check_fsdp_fits(cfg, why: str) -> None:
    """Raise ValueError when the config cannot run with FSDP; ``why`` says what asked for FSDP."""
    if cfg.model.lora is not None:
        raise ValueError(f"{why} shards full fine-tuning only: set model.lora=null, or train LoRA with "
                         "distributed.strategy=ddp (its trainable weights are small; configs/accelerate/ddp.yaml)")
    from fastgrpo.families import get_family

    if get_family(cfg.model.family).kind != "flow":
        raise ValueError(f"{why} supports the flow families, not model.family {cfg.model.family!r} (its rollouts "
                         "decode token by token, a different number of forwards per process); use "
                         "distributed.strategy=ddp")
    if cfg.algo == "aegpo":
        raise ValueError(f"{why} cannot run algo aegpo: its groups differ in size between processes (16 / 8 "
                         "rollouts per prompt) and its base-entropy probes run on the reference only where a prompt "
                         "is not cached yet, so processes would run different numbers of sharded forwards; use "
                         "distributed.strategy=ddp")


def _reshard_after_forward_from_accelerate() -> bool:
    value = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower()
    if value in ("true", "1", "full_shard"):
        return True
    if value in ("false", "0", "shard_grad_op", "no_reshard"):
        return False
    raise ValueError(f"accelerate config fsdp_reshard_after_forward: expected true or false, got {value!r}")


def parallelism(cfg, world_size: int):
    """`Replicated` or `Sharded` for this config and process group (see the module docstring)."""
    strategy = cfg.distributed.strategy
    reshard = True
    if strategy == "auto" and launched_with_fsdp():
        strategy = "fsdp"
        check_fsdp_fits(cfg, "accelerate launch with an FSDP config (distributed_type: FSDP, so "
                             "distributed.strategy auto is fsdp)")
        for env, key in _UNSUPPORTED_ACCELERATE_FSDP.items():
            if _env_true(env):
                raise ValueError(f"accelerate config {key}: true is not supported by fastgrpo's FSDP; set it false")
        reshard = _reshard_after_forward_from_accelerate()
    if strategy != "fsdp" or world_size == 1:
        return Replicated()
    return Sharded(reshard_after_forward=reshard)


# ---------------------------------------------------------------------------------------- tensors across ranks
def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a sharded one: every process must call it)."""
    return t.full_tensor() if is_sharded(t) else t


def local_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``like``: this process's shard of it when ``like`` is sharded (no communication:
    every process holds ``full``), else ``full`` on ``like``'s device and dtype."""
    full = full.to(like.device, like.dtype)
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def gather_full(tensors: dict, keep: bool) -> dict:
    """{name: whole tensor on CPU}, gathered one at a time; processes with ``keep=False`` take part in the
    gathering (FSDP) and drop the results."""
    out = {}
    for k, v in tensors.items():
        t = full_tensor(v.detach())
        if keep:
            out[k] = t.contiguous().cpu()
    return out


# ------------------------------------------------------------------------------------------------- strategies
class Replicated:
    """``ddp``: whole weights on every process; gradients averaged by hand after the local accumulation."""

    name = "ddp"
    shards = False

    def shard(self, trained, reference=None, block_classes=None) -> None:
        pass

    def sampling(self):
        return contextlib.nullcontext()

    def training(self):
        return contextlib.nullcontext()

    def check_same_forwards(self, count: int) -> None:
        pass

    def reduce_gradients(self, params) -> None:
        average_gradients(params)


class Sharded(Replicated):
    """``fsdp``: FSDP2 units per transformer block plus the root; gradients reduce-scattered by FSDP."""

    name = "fsdp"
    shards = True

    def __init__(self, reshard_after_forward: bool = True):
        self.reshard_after_forward = reshard_after_forward
        self.trained, self.reference = None, None

    def shard(self, trained, reference=None, block_classes=None) -> None:
        """Shard the trained network and the frozen reference in place (their parameters become DTensors: take
        the trainable parameters again afterwards). ``block_classes``: the class names of the FSDP units (the
        family adapter's `fsdp_block_classes`; None: the network's ``_no_split_modules``)."""
        self.trained = shard_blocks(trained, self.reshard_after_forward, block_classes)
        # The reference never runs backward: keeping its gathered blocks after forward would only hold memory.
        self.reference = shard_blocks(reference, True, block_classes) if reference is not None else None

    def blocks(self, module) -> list:
        return [m for m in module.modules() if m is not module and is_fsdp_unit(m)]

    @contextlib.contextmanager
    def sampling(self):
        """Gather the trained network's weights once; forwards inside run without collectives."""
        root = self.trained
        blocks = self.blocks(root)
        for m in [root, *blocks]:
            m.unshard()
        for m in blocks:
            m.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for m in blocks:
                m.set_reshard_after_forward(self.reshard_after_forward, recurse=False)
            # Reshards every unit and clears FSDP's per-iteration record of the forwards (the order it prefetches
            # in backward), which no-grad forwards would otherwise leave behind, different on every process.
            root.reset_iter_state()

    @contextlib.contextmanager
    def training(self):
        try:
            yield
        finally:
            if self.reference is not None:  # forward-only: nothing else clears its record of forwards
                self.reference.reset_iter_state()

    def check_same_forwards(self, count: int) -> None:
        """Raise ValueError on every process unless all of them run ``count`` training forwards."""
        counts = all_gather_cat(torch.tensor([count]))
        if len(set(counts.tolist())) > 1:
            raise ValueError(f"distributed.strategy fsdp needs the same number of training forwards on every "
                             f"process, got {counts.tolist()}; this variant trains different numbers of transitions "
                             "per process: use distributed.strategy=ddp")

    def reduce_gradients(self, params) -> None:
        pass  # FSDP reduce-scattered them in backward


def is_fsdp_unit(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_blocks(module, reshard_after_forward: bool, block_classes=None):
    """``fully_shard`` every block (the classes named in ``block_classes``, default the model's
    ``_no_split_modules``), then the module as the root."""
    from torch.distributed.fsdp import fully_shard

    names = set(block_classes if block_classes is not None else getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in module.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(module).__name__} names no transformer blocks (_no_split_modules) to shard with FSDP")
    for m in blocks:
        fully_shard(m, reshard_after_forward=reshard_after_forward)
    # The root keeps PyTorch's default (no reshard after forward: backward needs it at once).
    fully_shard(module)
    return module
