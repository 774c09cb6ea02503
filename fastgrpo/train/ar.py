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
  T2I-R1 / EG-GRPO, whose released trainers step once per round); with ``train.minibatches`` or
  ``train.inner_epochs`` > 1 the loop takes several optimizer steps per round (`GRPOTrainer.update`), each
  PPO-clipped (``train.clip_range``) against the sampling-time log-probs.

Logged per step besides the loop's fields: ``policy_loss``, ``kl``, ``ratio_mean``, ``clip_frac``,
``first_ratio_dev`` (max |ratio - 1| of the round's first update against the sampling-time log-probs: 0 up to
float error, since both are conditional log-probs of the same tokens), ``entropy_text`` / ``entropy_image`` (mean
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

from .distributed import STREAM_SAMPLE, step_generator
from .loop import GRPOTrainer, MicroBatch, TrainingDiverged


class ARTrainer(GRPOTrainer):
    MODEL_KIND = "model folder"

    def build_policy(self):
        from fastgrpo.ar import JanusPolicy, load_janus
        from fastgrpo.ar.janus import DTYPES

        cfg = self.cfg
        model, tok = load_janus(cfg.model.path, DTYPES[cfg.model.dtype], seed=cfg.seed)
        policy = JanusPolicy(model, tok, image_tokens=cfg.ar.image_tokens, cot_max_tokens=cfg.ar.cot_max_tokens,
                             cfg_weight=cfg.sample.guidance_scale, temperature=cfg.ar.temperature,
                             cot_template=cfg.ar.cot_template, image_template=cfg.ar.image_template,
                             device=self.device)
        if cfg.model.lora is not None:
            policy.add_lora(cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.targets or policy.lora_targets)
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
            data["first_sample"] = first + start  # global index of the micro-batch's first sample
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

    row_name = "rollout"

    def train_rows(self, batches: list) -> dict:
        """One row per rollout: its micro-batch (``mb``), its row there (``row``), its global group and, as its
        unit, its global sample index."""
        G = self.cfg.sample.group_size
        mbs, rws, idx = [], [], []
        for b, mb in enumerate(batches):
            n = len(mb.prompts)
            mbs.append(torch.full((n,), b))
            rws.append(torch.arange(n))
            idx.append(mb.data["first_sample"] + torch.arange(n))
        idx = torch.cat(idx)
        return {"mb": torch.cat(mbs), "row": torch.cat(rws), "group": idx // G, "unit": idx}

    def train(self, batches: list, rows: dict | None = None, *, n_all: int | None = None, first: bool = True,
              several: bool = False) -> dict:
        """One minibatch: per micro-batch, its rows of the minibatch (all of them with ``train.minibatches=1``)
        teacher-forced, one `grpo_token_loss` over their CoT and image tokens, weighted by their share of the
        minibatch's rollouts over all processes. One on-policy update (the round's only one) has no clipping
        (ratio ``exp(logp - logp.detach())``, as T2I-R1 / EG-GRPO); with several updates per round every update
        is PPO-clipped (``train.clip_range``) against the sampling-time log-probs. The reference log-probs are
        computed once per round (``train.beta > 0``)."""
        rows, n_all = self.whole_round(batches, rows, n_all)
        cfg, policy, strat = self.cfg, self.policy, self.strategy
        beta = strat.beta
        clip = cfg.train.clip_range if several else None
        if first:
            self._refs = [self._reference_logp(mb.data) if beta > 0 else None for mb in batches]
        keys = ("loss", "policy_loss", "kl", "ratio_mean", "clip_frac", "approx_kl", "entropy_text", "entropy_image",
                "low_frac_tokens", "high_frac_tokens")
        stats = dict.fromkeys(keys, 0.0)
        ratio_dev_max, n = 0.0, rows["mb"].numel()
        norm = n_all / self.world_size
        policy.train_mode(True)
        for b in tqdm(torch.unique(rows["mb"]).tolist(), desc="train", leave=False,
                      disable=not (cfg.log.progress and self.is_main)):
            sel = rows["row"][rows["mb"] == b]
            mb, ref = _take(batches[b], sel), self._refs[b]
            ref = ref.index_select(0, sel.to(ref.device)) if ref is not None else None
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
            share = len(sel) / norm
            (loss * share).backward()
            log_ratio = (logp.detach() - old)[mask]
            if log_ratio.numel():
                ratio_dev_max = max(ratio_dev_max, (log_ratio.exp() - 1).abs().max().item())
            kl = st["kl"].item()
            row = {"loss": loss.item(), "policy_loss": loss.item() - beta * kl, "kl": kl,
                   "ratio_mean": st["ratio"].item(), "clip_frac": st["clip_fraction"].item(),
                   "approx_kl": 0.5 * (log_ratio ** 2).mean().item() if log_ratio.numel() else 0.0}
            for name, t, v in (("text", terms[0], valid[0]), ("image", terms[1], valid[1])):
                row[f"entropy_{name}"] = (t.entropy[v].mean().item() if v.any() else 0.0)
            shaped = [(t, v) for m, (t, v) in enumerate(zip(terms, valid)) if strat.shapes(m)]
            n_shaped = sum(int(v.sum()) for _, v in shaped)
            row["low_frac_tokens"] = sum(int(t.low.sum()) for t, _ in shaped) / max(1, n_shaped)
            row["high_frac_tokens"] = sum(int(t.high.sum()) for t, _ in shaped) / max(1, n_shaped)
            for k in keys:
                stats[k] += row[k] * len(sel) / n
        policy.train_mode(False)
        stats["ratio_dev_max"] = ratio_dev_max
        stats["trained_rollouts"] = n_all
        stats["cot_tokens"] = sum(mb.data["cot_mask"].sum().item() for mb in batches) / sum(
            len(mb.prompts) for mb in batches)
        return stats


def _take(mb: MicroBatch, rows: torch.Tensor) -> MicroBatch:
    """The micro-batch restricted to ``rows`` (CPU int64): every per-sample tensor and the advantages."""
    n = len(mb.prompts)
    if rows.numel() == n and bool((rows == torch.arange(n)).all()):
        return mb
    data = {k: v.index_select(0, rows.to(v.device)) if torch.is_tensor(v) and v.ndim and v.shape[0] == n else v
            for k, v in mb.data.items()}
    return MicroBatch([mb.prompts[i] for i in rows.tolist()], data,
                      advantages=mb.advantages.index_select(0, rows.to(mb.advantages.device)))
