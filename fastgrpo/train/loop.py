"""The one GRPO loop for flow-matching image models, in named phases.

Each optimizer step runs:

1. **sample**  -- this rank's share of ``prompts_per_step`` groups of ``group_size`` rollouts, in micro-batches of
   ``sample.batch_size``, storing every latent x_0..x_T and each transition's log-prob (`fastgrpo.sde_step` at every
   step);
2. **score**   -- decode the final latents and call the reward; each micro-batch is scored in a worker thread while
   the next one samples;
3. **advantages** -- rewards gathered across ranks, then per-prompt statistics (`fastgrpo.ops.group_advantages`
   with the variant's conventions), each rank keeping its slice;
4. **select**  -- the variant's filter (none for Flow-GRPO / DanceGRPO);
5. **train**   -- per micro-batch (the same micro-batches as sampling: SD3's outputs depend on the batch size, and
   the importance ratio must be exactly 1 on the first inner step) and per trained step: the new log-prob of the
   stored transition and the KL to the reference in one fused `sde_step(prev_sample=..., v_ref=...)` call, the
   clipped surrogate, gradient accumulation over all of them, one optimizer step;
6. **log**     -- one ``metrics.jsonl`` row, tensorboard, progress bar; checkpoints every ``checkpoint.every``
   steps and at the end; ``curves.png`` at every checkpoint.

Randomness is derived from (seed, step, rank) for every step, so ``--resume`` from a checkpoint replays exactly the
steps a straight run would take (bit-identical weights on CPU).

A non-finite reward or loss stops the run with `TrainingDiverged` before the optimizer step, so the newest
checkpoint on disk is the last good state.
"""
from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from fastgrpo.ops import sde_step
from fastgrpo.rewards import build_reward

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import Config
from .distributed import GroupSampler, average_gradients, gathered_advantages, step_generator, world
from .metrics import MetricsLogger, plot_curves
from .prompts import load_prompts


class TrainingDiverged(RuntimeError):
    """A reward or the loss became NaN/inf; the run stopped before updating the weights."""


@dataclass
class MicroBatch:
    prompts: list
    emb: dict
    latents: torch.Tensor  # [b, T+1, ...] float32
    log_probs: torch.Tensor  # [b, T]
    rewards: torch.Tensor | None = None
    reward_parts: dict = field(default_factory=dict)
    advantages: torch.Tensor | None = None


class EMA:
    """Exponential moving average of the trainable weights: ``s = d*s + (1-d)*p`` after every optimizer step."""

    def __init__(self, named_params: dict, decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().clone().float() for k, p in named_params.items()}

    @torch.no_grad()
    def update(self, named_params: dict) -> None:
        for k, p in named_params.items():
            self.shadow[k].mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)


class Trainer:
    def __init__(self, cfg: Config, out_dir, *, resume: bool = False, device: str | None = None):
        from fastgrpo.algos import STRATEGIES
        from fastgrpo.diffusion.models import DTYPES, FlowModel, load_pipeline

        self.cfg = cfg
        self.out = Path(out_dir)
        if device is None:
            # accelerate sets up the process group under `accelerate launch` (gloo on CPU, NCCL on GPU) and picks
            # this process's device; in a single process it only picks the device.
            from accelerate import PartialState

            device = PartialState().device
        self.device = torch.device(device)
        self.rank, self.world_size = world()
        self.strategy = STRATEGIES[cfg.algo].from_config(cfg)
        self.prompts = load_prompts(cfg.prompts.source)
        self.reward_fn = build_reward(cfg.reward)
        total = cfg.sample.prompts_per_step * cfg.sample.group_size
        if total % (self.world_size * cfg.sample.batch_size):
            raise ValueError(f"prompts_per_step * group_size ({total}) must be a multiple of sample.batch_size "
                             f"({cfg.sample.batch_size}) times the number of processes ({self.world_size})")
        self.sampler = GroupSampler(len(self.prompts), cfg.sample.prompts_per_step, cfg.sample.group_size, cfg.seed)

        torch.manual_seed(cfg.seed)
        pipe = load_pipeline(cfg.model.family, cfg.model.path, DTYPES[cfg.model.dtype], seed=cfg.seed)
        self.model = FlowModel(pipe, cfg.model.family, height=cfg.model.height, width=cfg.model.width,
                               guidance_scale=cfg.sample.guidance_scale,
                               max_sequence_length=cfg.model.max_sequence_length, device=self.device)
        if cfg.model.lora is not None:
            self.params = self.model.add_lora(cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.targets)
        else:
            self.params = self.model.full_finetune(keep_reference=self.strategy.beta > 0)
        self.named = self.model.trainable_state()
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.train.lr, betas=(0.9, 0.999),
                                           weight_decay=cfg.train.weight_decay, eps=1e-8)
        self.ema = EMA(self.named, cfg.train.ema_decay)
        self.sigmas = self.model.sigmas(cfg.sample.num_steps)
        self.step, self.samples, self.elapsed = 0, 0, 0.0
        self.ckpt_dir = self.out / "checkpoints"

        self.is_main = self.rank == 0
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        resumed_from = None
        if resume:
            ckpt = latest_checkpoint(self.ckpt_dir)
            if ckpt is None:
                raise ValueError(f"--resume: no checkpoint under {self.ckpt_dir}")
            state = load_checkpoint(ckpt, trainable=self.named, ema=self.ema.shadow, optimizer=self.optimizer)
            self.step, self.samples, self.elapsed = state["step"], state["samples"], state["elapsed_s"]
            self.model.model_forwards = state["model_forwards"]
            resumed_from = self.step
        if self.is_main:
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            self.logger = MetricsLogger(self.out, tensorboard=cfg.log.tensorboard, resume_step=resumed_from)

    # ------------------------------------------------------------------------------------------------ phases
    @torch.no_grad()
    def sample(self, step: int, gen: torch.Generator, pool: ThreadPoolExecutor) -> list:
        cfg, model = self.cfg, self.model
        prompt_idx, group_idx = self.sampler.local(step, self.rank, self.world_size)
        bs = cfg.sample.batch_size
        batches, futures = [], []
        T = cfg.sample.num_steps
        sigma_max = self.sigmas[1].item()
        for start in tqdm(range(0, len(prompt_idx), bs), desc="sample", leave=False,
                          disable=not (cfg.log.progress and self.is_main)):
            pids, gids = prompt_idx[start:start + bs], group_idx[start:start + bs]
            prompts = [self.prompts[i] for i in pids.tolist()]
            emb = model.encode_prompts(prompts)
            if cfg.sample.same_noise_per_group:
                x = torch.cat([model.initial_latents(1, step_generator(cfg.seed, step, 1000 + int(g)))
                               for g in gids.tolist()])
            else:
                x = model.initial_latents(len(prompts), gen)
            lat, lps = [x], []
            for i in range(T):
                sig = self.sigmas[i].expand(len(prompts))
                v = model.velocity(x, sig, emb, cfg=True)
                out = sde_step(x, v, self.sigmas[i].item(), self.sigmas[i + 1].item(), kind=self.strategy.sde_kind,
                               noise_level=self.strategy.noise_level, sigma_max=sigma_max, generator=gen)
                x = out.prev_sample
                lat.append(x)
                lps.append(out.log_prob)
            mb = MicroBatch(prompts, emb, torch.stack(lat, 1), torch.stack(lps, 1))
            batches.append(mb)
            futures.append(pool.submit(self._score, model.decode(x), prompts))  # scored while the next samples
        for mb, fut in zip(batches, futures):
            mb.rewards, mb.reward_parts = fut.result()
        self.samples += len(prompt_idx) * self.world_size
        return batches

    def _score(self, images, prompts):
        total, parts = self.reward_fn(images, prompts)
        if not torch.isfinite(total).all():
            bad = [prompts[i] for i in torch.nonzero(~torch.isfinite(total)).flatten().tolist()]
            raise TrainingDiverged(f"a reward returned NaN/inf for prompts {bad[:3]}; parts: "
                                   f"{ {k: v.tolist()[:4] for k, v in parts.items()} }")
        return total, parts

    def advantages(self, batches: list) -> torch.Tensor:
        local = torch.cat([mb.rewards for mb in batches])
        s, tc = self.strategy, self.cfg.train
        adv, all_rewards = gathered_advantages(local, self.cfg.sample.group_size, std=s.adv_std, ddof=s.adv_ddof,
                                               eps=s.adv_eps, clip=tc.adv_clip)
        n = 0
        for mb in batches:
            mb.advantages = adv[n:n + len(mb.prompts)].to(self.device)
            n += len(mb.prompts)
        return all_rewards

    def select(self, batches: list) -> list:
        return batches

    def train(self, batches: list, gen: torch.Generator) -> dict:
        cfg, model, strat = self.cfg, self.model, self.strategy
        beta, clip = strat.beta, cfg.train.clip_range
        T = cfg.sample.num_steps
        sigma_max = self.sigmas[1].item()
        model.transformer.train()
        self.optimizer.zero_grad(set_to_none=True)
        plans = [strat.train_steps(T, len(mb.prompts), gen) for mb in batches]
        n_terms = sum(p.shape[1] for p in plans)
        stats = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "ratio_mean": 0.0, "clip_frac": 0.0}
        first_ratio_dev = None
        bar = tqdm(total=n_terms, desc="train", leave=False, disable=not (cfg.log.progress and self.is_main))
        for mb, plan in zip(batches, plans):
            b = len(mb.prompts)
            rows = torch.arange(b)
            weights = strat.step_weights(self.sigmas, plan)
            for k in range(plan.shape[1]):
                j = plan[:, k]
                x_t, x_next = mb.latents[rows, j], mb.latents[rows, j + 1]
                s, sn = self.sigmas[j].to(self.device), self.sigmas[j + 1].to(self.device)
                v = model.velocity(x_t, s, mb.emb, cfg=cfg.train.cfg)
                v_ref = None
                if beta > 0:
                    with torch.no_grad(), model.reference() as ref_net:
                        v_ref = model.velocity(x_t, s, mb.emb, cfg=cfg.train.cfg, transformer=ref_net)
                out = sde_step(x_t, v, s.double(), sn.double(), kind=strat.sde_kind, noise_level=strat.noise_level,
                               sigma_max=sigma_max, prev_sample=x_next, v_ref=v_ref)
                old = mb.log_probs[rows, j].to(self.device)
                ratio = torch.exp(out.log_prob - old)
                if first_ratio_dev is None:
                    first_ratio_dev = (ratio.detach() - 1).abs().max().item()
                adv = mb.advantages
                surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
                w = weights[:, k].to(self.device) if weights is not None else 1.0
                policy = (w * surrogate).mean()
                kl = out.kl.mean() if out.kl is not None else torch.zeros((), device=self.device)
                loss = policy + beta * kl
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"the loss became {loss.item()} at denoising step {j.tolist()}; "
                                           "weights not updated")
                (loss / n_terms).backward()
                stats["loss"] += loss.item() / n_terms
                stats["policy_loss"] += policy.item() / n_terms
                stats["kl"] += kl.item() / n_terms
                stats["ratio_mean"] += ratio.detach().mean().item() / n_terms
                stats["clip_frac"] += ((ratio.detach() - 1).abs() > clip).float().mean().item() / n_terms
                bar.update(1)
        bar.close()
        average_gradients(self.params)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.train.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise TrainingDiverged(f"the gradient norm became {grad_norm.item()}; weights not updated")
        self.optimizer.step()
        self.ema.update(self.named)
        model.transformer.eval()
        stats["grad_norm"] = grad_norm.item()
        stats["first_ratio_dev"] = first_ratio_dev
        return stats

    # --------------------------------------------------------------------------------------------------- run
    def run(self) -> Path:
        cfg = self.cfg
        t0 = time.time() - self.elapsed
        outer = tqdm(range(self.step, cfg.train.steps), desc=f"{cfg.algo} train", initial=self.step,
                     total=cfg.train.steps, disable=not (cfg.log.progress and self.is_main))
        with ThreadPoolExecutor(max_workers=1) as pool:
            for step in outer:
                gen = step_generator(cfg.seed, step, stream=1 + self.rank)
                batches = self.sample(step, gen, pool)
                all_rewards = self.advantages(batches)
                batches = self.select(batches)
                stats = self.train(batches, gen)
                self.step = step + 1
                self.elapsed = time.time() - t0
                row = {"step": self.step, "reward_mean": all_rewards.mean().item(),
                       "reward_std": all_rewards.std(unbiased=False).item(), **stats, "time_s": self.elapsed,
                       "samples": self.samples, "model_forwards": self.model.model_forwards * self.world_size,
                       "lr": self.optimizer.param_groups[0]["lr"]}
                parts = {}
                for mb in batches:
                    for k, v in mb.reward_parts.items():
                        parts.setdefault(k, []).append(v)
                if len(parts) > 1:
                    row.update({f"reward_{k}": torch.cat(v).mean().item() for k, v in parts.items()})
                if self.is_main:
                    self.logger.log(row)
                    outer.set_postfix(reward=f"{row['reward_mean']:.4f}", kl=f"{row['kl']:.2e}")
                if self.step % cfg.checkpoint.every == 0 or self.step == cfg.train.steps:
                    self.save()
        if self.is_main:
            self.logger.close()
        return self.out

    def save(self) -> None:
        if not self.is_main:
            return
        save_checkpoint(self.ckpt_dir, self.step, trainable=self.named, ema=self.ema.shadow,
                        optimizer=self.optimizer,
                        state={"samples": self.samples, "model_forwards": self.model.model_forwards,
                               "elapsed_s": self.elapsed, "config": self.cfg.to_dict()})
        plot_curves(self.out)


def train(cfg: Config, out_dir, *, resume: bool = False) -> Path:
    """Run (or resume) a training; returns the run folder."""
    trainer = Trainer(cfg, out_dir, resume=resume)
    try:
        return trainer.run()
    except TrainingDiverged:
        if trainer.is_main and (Path(out_dir) / "metrics.jsonl").exists():
            plot_curves(out_dir)
        raise
