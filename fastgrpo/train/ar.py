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

Host reads (each a device sync on CUDA): the train phase reads the device once, at its end (the statistics and every
micro-batch's loss, stacked; a non-finite loss then raises `TrainingDiverged` naming the micro-batch, before the
loop's optimizer step); sampling reads once per CoT token (the early stop when every row has ended) and per
micro-batch (the CoTs' text, the rewards), never per image token (`fastgrpo.ar.janus.JanusPolicy` hands SDPA its
4-D attention mask, so transformers does not read the padding mask per forward).

On CUDA ``ar.impl="auto"`` runs the token ops' Triton kernels (no float32 [B, L, V] softmax); on CPU it runs their
torch reference unless a C++ kernel is built (``ar.impl=triton`` uses Triton's interpreter under
``TRITON_INTERPRET=1``, slow but memory-light).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm.auto import tqdm

from fastgrpo.algos.eg_grpo import IGNORE_INDEX
from fastgrpo.diffusion.graphs import to_device
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
        # validate=False: no host read per micro-batch; a bad target gives NaN, which the loss check catches
        out = [token_logprob_entropy(lg, tg, temperature=T, ignore_index=IGNORE_INDEX, impl=self.cfg.ar.impl,
                                     validate=False)[0]
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
        computed once per round (``train.beta > 0``).

        Per micro-batch nothing waits for the device: the statistics (float64 sums, each micro-batch's weighted by
        its share ``len(rows) / n`` of the minibatch) and every micro-batch's loss stay on the device and are read
        once at the end; a non-finite loss then stops the run (`TrainingDiverged`, naming the micro-batch and its
        first prompts) before the loop's optimizer step, with the weights unchanged."""
        rows, n_all = self.whole_round(batches, rows, n_all)
        cfg, policy, strat = self.cfg, self.policy, self.strategy
        beta = strat.beta
        clip = cfg.train.clip_range if several else None
        if first:
            self._refs = [self._reference_logp(mb.data) if beta > 0 else None for mb in batches]
        n = rows["mb"].numel()
        norm = n_all / self.world_size
        # The minibatch's rows per micro-batch, from one read of the (CPU) row tensors.
        per_mb: dict = {}
        for b, r in zip(rows["mb"].tolist(), rows["row"].tolist()):
            per_mb.setdefault(b, []).append(r)
        f64 = dict(dtype=torch.float64, device=self.device)
        names = ("policy_loss", "kl", "ratio_mean", "clip_frac", "approx_kl", "entropy_text", "entropy_image",
                 "low_frac_tokens", "high_frac_tokens")
        acc = {k: torch.zeros((), **f64) for k in (*names, "ratio_dev_max")}
        losses, where = [], []
        policy.train_mode(True)
        for b in tqdm(sorted(per_mb), desc="train", leave=False, disable=not (cfg.log.progress and self.is_main)):
            mb, take = _take(batches[b], per_mb[b])
            ref = take(self._refs[b]) if self._refs[b] is not None else None
            text_logits, image_logits = policy.teacher_forced_logits(mb.data)
            # validate=False: the token ops read nothing on the host; a bad target gives a NaN log-prob, so a NaN
            # loss, which the finiteness check at the end of the phase catches
            terms = [strat.token_terms(lg, tg, m, mb.advantages, temperature=cfg.ar.temperature, impl=cfg.ar.impl,
                                       validate=False)
                     for m, (lg, tg) in enumerate(zip((text_logits, image_logits), self._targets(mb.data)))]
            valid = [mb.data["cot_mask"], torch.ones_like(mb.data["image_ids"], dtype=torch.bool)]
            logp = torch.cat([t.logp for t in terms], 1)
            mask = torch.cat(valid, 1)
            old = torch.cat([mb.data["cot_old_logp"], mb.data["image_old_logp"]], 1)
            loss, st = grpo_token_loss(logp, old if clip is not None else None, ref,
                                       torch.cat([t.token_adv for t in terms], 1), mask, clip_eps=clip, beta=beta)
            share = len(per_mb[b]) / norm
            (loss * share).backward()
            losses.append(loss.detach())
            where.append(b)
            w = len(per_mb[b]) / n  # the micro-batch's weight in the minibatch's means
            with torch.no_grad():
                kl = st["kl"].double()
                acc["policy_loss"] += (loss.double() - beta * kl) * w
                acc["kl"] += kl * w
                acc["ratio_mean"] += st["ratio"].double() * w
                acc["clip_frac"] += st["clip_fraction"].double() * w
                # Over the valid tokens (select, never multiply: padding may hold anything); 0 without any.
                log_ratio = torch.where(mask, logp.detach() - old, torch.zeros((), device=old.device))
                count = mask.sum().clamp_min(1)
                acc["approx_kl"] += 0.5 * log_ratio.double().square().sum() / count * w
                acc["ratio_dev_max"] = torch.maximum(acc["ratio_dev_max"], (log_ratio.exp() - 1).abs().max().double())
                for name, t, v in (("text", terms[0], valid[0]), ("image", terms[1], valid[1])):
                    ent = torch.where(v, t.entropy.detach(), torch.zeros((), device=v.device)).double()
                    acc[f"entropy_{name}"] += ent.sum() / v.sum().clamp_min(1) * w
                shaped = [(t, v) for m, (t, v) in enumerate(zip(terms, valid)) if strat.shapes(m)]
                if shaped:
                    n_shaped = sum(v.sum() for _, v in shaped).clamp_min(1).double()
                    acc["low_frac_tokens"] += sum(t.low.sum() for t, _ in shaped).double() / n_shaped * w
                    acc["high_frac_tokens"] += sum(t.high.sum() for t, _ in shaped).double() / n_shaped * w
        policy.train_mode(False)
        cot = torch.stack([mb.data["cot_mask"].sum() for mb in batches]).sum().double()
        keys = (*names, "ratio_dev_max")
        values = torch.stack([acc[k] for k in keys] + [cot] + [v.double() for v in losses]).tolist()  # one read
        stats, cot, chunk_losses = dict(zip(keys, values)), values[len(keys)], values[len(keys) + 1:]
        bad = next((i for i, v in enumerate(chunk_losses) if not math.isfinite(v)), None)
        if bad is not None:
            b = where[bad]
            prompts = [batches[b].prompts[r] for r in per_mb[b]]
            raise TrainingDiverged(f"the loss became {chunk_losses[bad]} in micro-batch {b} (prompts {prompts[:3]}); "
                                   "weights not updated")
        stats = {"loss": sum(v * len(per_mb[b]) / n for v, b in zip(chunk_losses, where)), **stats,
                 "trained_rollouts": n_all, "cot_tokens": cot / sum(len(mb.prompts) for mb in batches)}
        return stats


def _take(mb: MicroBatch, rows: list) -> tuple:
    """``(micro-batch, take)``: the micro-batch restricted to ``rows`` (a list of ints: every per-sample tensor and
    the advantages) and ``take(t)``, the same rows of another per-sample tensor; the micro-batch itself and the
    identity when every row is taken in order. The index goes to each device once, without blocking (no host
    read)."""
    n = len(mb.prompts)
    if rows == list(range(n)):
        return mb, lambda t: t
    idx = torch.tensor(rows, dtype=torch.int64)
    on: dict = {}

    def take(t):
        if t.device not in on:
            on[t.device] = to_device(idx, t.device)
        return t.index_select(0, on[t.device])

    data = {k: take(v) if torch.is_tensor(v) and v.ndim and v.shape[0] == n else v for k, v in mb.data.items()}
    return MicroBatch([mb.prompts[i] for i in rows], data, advantages=take(mb.advantages)), take
