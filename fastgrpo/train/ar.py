"""The autoregressive family's phases (Janus / Janus-Pro): two-stage rollouts and the token-level GRPO update.

* **sample** (per micro-batch of ``sample.batch_size``): a textual chain of thought from the reasoning template,
  then ``ar.image_tokens`` image tokens with classifier-free guidance (``sample.guidance_scale``), both with a KV
  cache (`fastgrpo.ar.JanusPolicy`), each sample's tokens drawn from its own generator, keyed by its global sample
  index (so 1 and N processes sample the same tokens); the images, decoded by the VQ decoder, are scored in the
  loop's worker thread while the next micro-batch samples. Each rollout keeps its prompts, CoT and image
  tokens and their conditional log-probs at sampling time.
* **train** (per micro-batch, the same batches as sampling): the teacher-forced forward on the conditional prompts
  (text logits from ``lm_head`` over the CoT, image logits from the generation head over the image tokens); each
  modality's token terms from the variant (`fastgrpo.algos.eg_grpo.EGGRPO.token_terms`: `eg_grpo_shaping` for a
  shaped modality, `token_logprob_entropy` otherwise); the reference's log-probs (no grad; LoRA disabled or the
  frozen copy); then one `grpo_token_loss` over the CoT and image tokens of the micro-batch together (token mean,
  k3 KL with ``train.beta``). One on-policy update has no clipping (ratio ``exp(logp - logp.detach())``, as
  T2I-R1 / EG-GRPO); with ``ar.inner_epochs = K > 1`` the batch is used for K optimizer steps with PPO clipping
  (``train.clip_range``) against the sampling-time log-probs, the first K - 1 steps taken here and the last by the
  loop.

Logged per step besides the loop's fields: ``policy_loss``, ``kl``, ``ratio_mean``, ``clip_frac``,
``first_ratio_dev`` (max |ratio - 1| of the first inner epoch against the sampling-time log-probs: 0 up to float
error, since both are conditional log-probs of the same tokens), ``entropy_text`` / ``entropy_image`` (mean
normalised token entropy, H / ln V), ``low_frac_tokens`` / ``high_frac_tokens`` (fractions of shaped tokens in the
low / high masks) and ``cot_tokens`` (mean CoT length).

On CUDA ``ar.impl="auto"`` runs the token ops' Triton kernels (no float32 [B, L, V] softmax); on CPU it runs their
torch reference unless a C++ kernel is built (``ar.impl=triton`` uses Triton's interpreter under
``TRITON_INTERPRET=1``, slow but memory-light).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm.auto import tqdm

from fastgrpo.algos.eg_grpo import IGNORE_INDEX
from fastgrpo.ops import grpo_token_loss, token_logprob_entropy

from .config import LoraConfig
from .distributed import STREAM_SAMPLE, step_generator
from .loop import GRPOTrainer, MicroBatch, TrainingDiverged


class ARTrainer(GRPOTrainer):
    MODEL_KIND = "model folder"

    def build_policy(self):
        from fastgrpo.ar import JANUS_LORA_TARGETS, JanusPolicy, load_janus
        from fastgrpo.ar.models import DTYPES

        cfg = self.cfg
        model, tok = load_janus(cfg.model.path, DTYPES[cfg.model.dtype], seed=cfg.seed)
        policy = JanusPolicy(model, tok, image_tokens=cfg.ar.image_tokens, cot_max_tokens=cfg.ar.cot_max_tokens,
                             cfg_weight=cfg.sample.guidance_scale, temperature=cfg.ar.temperature,
                             cot_template=cfg.ar.cot_template, image_template=cfg.ar.image_template,
                             device=self.device)
        if cfg.model.lora is not None:
            targets = cfg.model.lora.targets
            if list(targets) == LoraConfig().targets:  # the flow families' default: use Janus's own
                targets = JANUS_LORA_TARGETS
            policy.add_lora(cfg.model.lora.rank, cfg.model.lora.alpha, targets)
        else:
            policy.full_finetune(keep_reference=self.strategy.beta > 0)
        return policy, policy.trainable_state()

    @torch.no_grad()
    def sample(self, step: int, pool: ThreadPoolExecutor) -> list:
        cfg, policy = self.cfg, self.policy
        prompt_idx, _ = self.sampler.local(step, self.rank, self.world_size)
        bs = cfg.sample.batch_size
        first = self.rank * len(prompt_idx)  # this rank's first global sample index
        batches, futures = [], []
        for start in tqdm(range(0, len(prompt_idx), bs), desc="sample", leave=False,
                          disable=not (cfg.log.progress and self.is_main)):
            prompts = [self.prompts[i] for i in prompt_idx[start:start + bs].tolist()]
            # One generator per global sample index: its tokens do not depend on the number of processes.
            gens = [step_generator(cfg.seed, step, STREAM_SAMPLE, first + start + j) for j in range(len(prompts))]
            data = policy.sample_cot(prompts, gens)
            cots = policy.decode_cots(data["cot_ids"], data["cot_mask"])
            data.update(policy.sample_image_tokens(prompts, cots, gens))
            batches.append(MicroBatch(prompts, data))
            futures.append(self.submit_score(pool, policy.decode(data["image_ids"]), prompts))
        self.collect_scores(batches, futures)
        self.samples += len(prompt_idx) * self.world_size
        return batches

    @torch.no_grad()
    def preview(self, prompts, gens):
        """One image per prompt: the CoT and image tokens sampled as in training, from the fixed ``gens``."""
        policy = self.policy
        data = policy.sample_cot(prompts, gens)
        data.update(policy.sample_image_tokens(prompts, policy.decode_cots(data["cot_ids"], data["cot_mask"]), gens))
        return policy.decode(data["image_ids"])

    @staticmethod
    def _targets(data: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(CoT targets with -100 after the EOS, image targets)."""
        cot = torch.where(data["cot_mask"], data["cot_ids"], torch.full_like(data["cot_ids"], IGNORE_INDEX))
        return cot, data["image_ids"]

    @torch.no_grad()
    def _reference_logp(self, data: dict) -> torch.Tensor:
        """[B, C + N] log-probs of the CoT and image tokens under the reference policy."""
        policy, T = self.policy, self.cfg.ar.temperature
        with policy.reference() as parts:
            text_logits, image_logits = policy.teacher_forced_logits(data, parts)
        out = [token_logprob_entropy(lg, tg, temperature=T, ignore_index=IGNORE_INDEX, impl=self.cfg.ar.impl)[0]
               for lg, tg in zip((text_logits, image_logits), self._targets(data))]
        return torch.cat(out, 1)

    def train(self, batches: list) -> dict:
        cfg, policy, strat = self.cfg, self.policy, self.strategy
        beta, epochs = strat.beta, cfg.ar.inner_epochs
        clip = cfg.train.clip_range if epochs > 1 else None
        refs = [self._reference_logp(mb.data) if beta > 0 else None for mb in batches]
        keys = ("loss", "policy_loss", "kl", "ratio_mean", "clip_frac", "entropy_text", "entropy_image",
                "low_frac_tokens", "high_frac_tokens")
        stats = dict.fromkeys(keys, 0.0)
        first_ratio_dev = 0.0
        n_terms = epochs * len(batches)
        policy.train_mode(True)
        bar = tqdm(total=n_terms, desc="train", leave=False, disable=not (cfg.log.progress and self.is_main))
        for epoch in range(epochs):
            if epoch > 0:  # the loop takes the last optimizer step
                self.optimizer_step()
                self.optimizer.zero_grad(set_to_none=True)
            for mb, ref in zip(batches, refs):
                text_logits, image_logits = policy.teacher_forced_logits(mb.data)
                terms = [strat.token_terms(lg, tg, m, mb.advantages, temperature=cfg.ar.temperature, impl=cfg.ar.impl)
                         for m, (lg, tg) in enumerate(zip((text_logits, image_logits), self._targets(mb.data)))]
                valid = [mb.data["cot_mask"], torch.ones_like(mb.data["image_ids"], dtype=torch.bool)]
                logp = torch.cat([t.logp for t in terms], 1)
                mask = torch.cat(valid, 1)
                old = torch.cat([mb.data["cot_old_logp"], mb.data["image_old_logp"]], 1)
                loss, st = grpo_token_loss(logp, old if clip is not None else None, ref,
                                           torch.cat([t.token_adv for t in terms], 1), mask, clip_eps=clip, beta=beta)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"the loss became {loss.item()}; weights not updated")
                (loss / len(batches)).backward()
                if epoch == 0:
                    dev = ((logp.detach() - old).exp() - 1).abs()[mask]
                    first_ratio_dev = max(first_ratio_dev, dev.max().item() if dev.numel() else 0.0)
                kl = st["kl"].item()
                row = {"loss": loss.item(), "policy_loss": loss.item() - beta * kl, "kl": kl,
                       "ratio_mean": st["ratio"].item(), "clip_frac": st["clip_fraction"].item()}
                for name, t, v in (("text", terms[0], valid[0]), ("image", terms[1], valid[1])):
                    row[f"entropy_{name}"] = (t.entropy[v].mean().item() if v.any() else 0.0)
                shaped = [(t, v) for m, (t, v) in enumerate(zip(terms, valid)) if strat.shapes(m)]
                n_shaped = sum(int(v.sum()) for _, v in shaped)
                row["low_frac_tokens"] = sum(int(t.low.sum()) for t, _ in shaped) / max(1, n_shaped)
                row["high_frac_tokens"] = sum(int(t.high.sum()) for t, _ in shaped) / max(1, n_shaped)
                for k in keys:
                    stats[k] += row[k] / n_terms
                bar.update(1)
        bar.close()
        policy.train_mode(False)
        stats["first_ratio_dev"] = first_ratio_dev
        stats["cot_tokens"] = sum(mb.data["cot_mask"].sum().item() for mb in batches) / sum(
            len(mb.prompts) for mb in batches)
        return stats
