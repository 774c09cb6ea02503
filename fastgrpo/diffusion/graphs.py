"""CUDA graphs for the sampling forwards of a flow adapter (`fastgrpo.diffusion.adapter.FlowAdapter`;
``sample.cuda_graphs``), and a host->device copy that never blocks the host.

A rollout evaluates the transformer on chunks of the same shape step after step; at small per-GPU batches the
GPU then waits for Python (diffusers runs every block from Python). `GraphedVelocity` captures
``FlowAdapter.velocity`` (CFG batch, transformer, guidance combine) once per input shape in a ``torch.cuda.CUDAGraph``
and replays it: one launch per forward, whatever the number of kernels.

Decisions (where DESIGN.md is silent):

* Only no-grad sampling forwards of the policy are graphed (``FlowTrainer.velocity(graphs=True)`` from the
  rollout): training needs autograd, the reference network and AEGPO's collector change what a forward does.
* Weights are read through the captured pointers, so in-place optimizer updates (AdamW on LoRA or full weights) are
  seen by later replays; nothing that *replaces* a parameter tensor may happen after a capture (FSDP does, hence
  ``sample.cuda_graphs`` is refused with ``distributed.strategy fsdp``).
* A graph is captured on the first forward of each shape (after two eager warm-up forwards on a side stream, which
  also trigger ``model.compile``'s compilation), all graphs sharing one memory pool. If a capture fails (an
  operation that cannot be captured), a warning says why and that shape runs eagerly from then on: slower, never
  wrong.
* Replays return a copy of the graph's output (the next replay overwrites it). ``model_forwards`` counts replays as
  the eager forwards they stand for.
"""
from __future__ import annotations

import warnings

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without blocking the host: a CPU tensor goes to a CUDA device from pinned memory with
    ``non_blocking=True`` (a plain ``.to`` of pageable memory synchronises the stream first)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class _Graph:
    __slots__ = ("graph", "x", "sigma", "emb", "out", "forwards")


class GraphedVelocity:
    """``model.velocity(x, sigma, emb, cfg=cfg)`` (no grad, the policy) through one CUDA graph per input shape."""

    def __init__(self, model, warmup: int = 2):
        self.model = model
        self.warmup = warmup
        self.graphs: dict = {}
        self.failed: dict = {}  # key -> reason: shapes that run eagerly
        self.pool = None
        self.replays = 0

    @staticmethod
    def _key(x, sigma, emb, cfg):
        return (tuple(x.shape), x.dtype, tuple(sigma.shape), bool(cfg),
                tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(emb.items())))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, emb: dict, *, cfg: bool = True) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("GraphedVelocity is for no-grad sampling forwards")
        key = self._key(x, sigma, emb, cfg)
        if key in self.failed:
            return self.model.velocity(x, sigma, emb, cfg=cfg)
        g = self.graphs.get(key)
        if g is None:
            g = self._capture(key, x, sigma, emb, cfg)
            if g is None:
                return self.model.velocity(x, sigma, emb, cfg=cfg)
        g.x.copy_(x, non_blocking=True)
        g.sigma.copy_(sigma, non_blocking=True)
        for k, v in emb.items():
            g.emb[k].copy_(v, non_blocking=True)
        g.graph.replay()
        self.replays += 1
        self.model.model_forwards += g.forwards
        return g.out.clone()

    def _capture(self, key, x, sigma, emb, cfg):
        model = self.model
        counted = model.model_forwards
        g = _Graph()
        g.x = x.detach().clone()
        g.sigma = sigma.detach().to(x.device).clone()
        g.emb = {k: v.detach().clone() for k, v in emb.items()}
        try:
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    model.velocity(g.x, g.sigma, g.emb, cfg=cfg)
            torch.cuda.current_stream(x.device).wait_stream(side)
            before = model.model_forwards
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            g.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g.graph, pool=self.pool):
                g.out = model.velocity(g.x, g.sigma, g.emb, cfg=cfg)
            g.forwards = model.model_forwards - before
        except Exception as e:  # noqa: BLE001 -- any capture failure falls back to eager forwards, loudly
            self.failed[key] = f"{type(e).__name__}: {e}"
            warnings.warn(f"sample.cuda_graphs: could not capture the sampling forward of shape {tuple(x.shape)} "
                          f"({self.failed[key]}); this shape runs eagerly", RuntimeWarning, stacklevel=3)
            model.model_forwards = counted
            torch.cuda.synchronize(x.device)
            return None
        model.model_forwards = counted  # warm-up and capture forwards are not the run's forwards
        self.graphs[key] = g
        return g
