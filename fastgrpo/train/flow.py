"""The flow-matching family's phases (SD3/SD3.5, FLUX): SDE rollouts and the per-transition GRPO update.

* **sample** stores every latent x_0..x_T and each transition's log-prob, calling `fastgrpo.sde_step` at every
  step with the variant's SDE kind and noise level;
* **train** goes over the same micro-batches as sampling (SD3's outputs depend on the batch size, and the
  importance ratio must be exactly 1 on the first inner step) and, per micro-batch and trained step (the
  strategy's plan, per sample), recomputes the transition's log-prob and the KL to the reference in one fused
  ``sde_step(prev_sample=..., v_ref=...)`` call, then the clipped surrogate ``max(-A r, -A clip(r, 1-e, 1+e))``
  (Flow-GRPO's ``policy_loss``) plus ``beta * kl``, accumulating gradients over all of them.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm.auto import tqdm

from fastgrpo.ops import sde_step

from .distributed import step_generator
from .loop import GRPOTrainer, MicroBatch, TrainingDiverged


class FlowTrainer(GRPOTrainer):
    def build_policy(self):
        from fastgrpo.diffusion.models import DTYPES, FlowModel, load_pipeline

        cfg = self.cfg
        pipe = load_pipeline(cfg.model.family, cfg.model.path, DTYPES[cfg.model.dtype], seed=cfg.seed)
        model = FlowModel(pipe, cfg.model.family, height=cfg.model.height, width=cfg.model.width,
                          guidance_scale=cfg.sample.guidance_scale, max_sequence_length=cfg.model.max_sequence_length,
                          device=self.device)
        if cfg.model.lora is not None:
            model.add_lora(cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.targets)
        else:
            model.full_finetune(keep_reference=self.strategy.beta > 0)
        self.sigmas = model.sigmas(cfg.sample.num_steps)
        return model, model.trainable_state()

    @torch.no_grad()
    def sample(self, step: int, gen: torch.Generator, pool: ThreadPoolExecutor) -> list:
        cfg, model = self.cfg, self.policy
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
            batches.append(MicroBatch(prompts, {"emb": emb, "latents": torch.stack(lat, 1),
                                                "log_probs": torch.stack(lps, 1)}))
            futures.append(self.submit_score(pool, model.decode(x), prompts))  # scored while the next samples
        self.collect_scores(batches, futures)
        self.samples += len(prompt_idx) * self.world_size
        return batches

    def train(self, batches: list, gen: torch.Generator) -> dict:
        cfg, model, strat = self.cfg, self.policy, self.strategy
        beta, clip = strat.beta, cfg.train.clip_range
        T = cfg.sample.num_steps
        sigma_max = self.sigmas[1].item()
        model.transformer.train()
        plans = [strat.train_steps(T, len(mb.prompts), gen) for mb in batches]
        n_terms = sum(p.shape[1] for p in plans)
        stats = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "ratio_mean": 0.0, "clip_frac": 0.0}
        first_ratio_dev = None
        bar = tqdm(total=n_terms, desc="train", leave=False, disable=not (cfg.log.progress and self.is_main))
        for mb, plan in zip(batches, plans):
            b = len(mb.prompts)
            emb, latents, log_probs = mb.data["emb"], mb.data["latents"], mb.data["log_probs"]
            rows = torch.arange(b)
            weights = strat.step_weights(self.sigmas, plan)
            for k in range(plan.shape[1]):
                j = plan[:, k]
                x_t, x_next = latents[rows, j], latents[rows, j + 1]
                s, sn = self.sigmas[j].to(self.device), self.sigmas[j + 1].to(self.device)
                v = model.velocity(x_t, s, emb, cfg=cfg.train.cfg)
                v_ref = None
                if beta > 0:
                    with torch.no_grad(), model.reference() as ref_net:
                        v_ref = model.velocity(x_t, s, emb, cfg=cfg.train.cfg, transformer=ref_net)
                out = sde_step(x_t, v, s.double(), sn.double(), kind=strat.sde_kind, noise_level=strat.noise_level,
                               sigma_max=sigma_max, prev_sample=x_next, v_ref=v_ref)
                old = log_probs[rows, j].to(self.device)
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
        model.transformer.eval()
        stats["first_ratio_dev"] = first_ratio_dev
        return stats

