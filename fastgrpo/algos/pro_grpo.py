"""Pro-GRPO's expand-and-prune funnel (`PruneSchedule`) and its FLOP cost model (`CostModel`).

Pro-GRPO (seed 002, "Expand and Prune", §5 and eq. 17) starts G_max trajectories per prompt. At checkpoint steps
``t_1 < ... < t_I`` of the T-step sampler it previews every active trajectory's end with one Euler ODE step,
``x0_hat = x_t - sigma_t * v`` (the velocity ``v`` at step t is the one the sampler computes anyway), decodes and
scores the previews, and keeps the ``K_{i+1}`` of ``K_i`` whose preview rewards have the largest variance
(`fastgrpo.ovf_select`); the rest stop. GRPO then trains on the ``K`` final survivors.

Step convention (0-based, as the sampler loops ``for s in range(T)``): a checkpoint ``t`` happens at the start of
step ``t``, after ``t`` completed steps; all ``K_i`` active trajectories evaluate the velocity at step t (which
the preview needs), and only the ``K_{i+1}`` survivors take that step.

Paper settings (§6.1) as presets, with the plain-GRPO run each one is compared against:

=========  =========  ==================  ============  ========================================================
preset     T          checkpoints         funnel        baseline
=========  =========  ==================  ============  ========================================================
standard   10         {5, 7}              48 -> 24 -> 12  Flow-GRPO, G = 24, T = 10
flash      10         {5, 7} (assumed*)   24 -> 16 -> 12  Flow-GRPO, G = 24, T = 10
dance      50         {30, 40}            48 -> 32 -> 8   DanceGRPO, G = 16, T = 50
=========  =========  ==================  ============  ========================================================

(*) the paper gives Flash's path but not its checkpoints; the Standard ones reproduce its Table 4 cost.

Cost model
----------
`CostModel` counts the TFLOPs of one sampling-and-training epoch from per-call costs (Table 4's atomic
operations, SD3.5-M at 512 px: transformer forward 3.88, VAE decode 2.49, reward 0.34). Assumptions:

* CFG: each sampled step costs 2 transformer forwards (conditional + unconditional), and so does each trained
  step (Flow-GRPO trains with CFG); the text encoders, scheduler arithmetic and optimizer step are not counted.
* Training: ``int(T * train_fraction)`` steps per surviving trajectory (Flow-GRPO's ``timestep_fraction`` 0.99
  -> 9 of 10), each a forward plus a backward of ``backward_factor`` (2) forwards, plus one reference forward
  for the KL when ``reference_kl`` (Flow-GRPO's beta = 0.01 > 0).
* Decodes and reward calls: one per preview (every active trajectory at every checkpoint) and one per final image.
* Previews: ``preview_forward=False`` (fastgrpo) reuses the velocity of the checkpoint step, so a trajectory
  pruned at t costs one forward at step t and a survivor costs nothing extra; ``preview_forward=True`` counts one
  separate forward per preview, on top of the survivors' own step.
* ``prompts`` groups per epoch: 48 (Flow-GRPO's ``pickscore_sd3`` config: 48 prompts x 24 images).

Against the paper's Table 4 (Flow-GRPO 453,474 TFLOPs; Pro-GRPO Standard 335,627 (1.35x); Flash 267,366
(1.70x)):

* ``TABLE4_ACCOUNTING`` (``preview_forward=True``, all T steps trained) reproduces each total within 1.3%:
  450,236 (-0.7%), 337,703 (+0.6%), 270,780 (+1.3%), i.e. 1.33x and 1.66x. So the paper evidently ran the
  preview as a separate forward and counted every step in training. The rest (about 1%) is not explained by the
  rounding of the per-call costs (at most 0.13%); the appendix with the paper's own procedure is not in our copy,
  so per-call costs measured at other batch sizes, or text-encoder and EMA costs, are the likely remainder.
* The default ``CostModel()`` (fastgrpo's loop: the preview reuses the checkpoint's forward, 9 of 10 steps
  trained) gives 414,478 / 306,415 / 242,471 TFLOPs: 1.353x and 1.709x, within 0.8% of the paper's ratios,
  with totals 8.6-9.3% lower (one trained step fewer per trajectory).

FLOP ratios are not the wall-clock speedups of Table 1 (1.26x, 1.41x): decoding and scoring previews, and
small survivor batches, cost more time than their FLOPs.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar, Dict, Optional, Tuple

import torch

from fastgrpo.algos.flow_grpo import FlowGRPO
from fastgrpo.ops.ovf import OVFSelection, ovf_select

from .base import GroupPlan


@dataclass(frozen=True)
class PruneSchedule:
    """The expand-and-prune funnel: ``survivors[i]`` trajectories are active until ``checkpoints[i]``.

    Args:
        num_steps: T, the sampler's denoising steps.
        checkpoints: steps ``0 < t_1 < ... < t_I < T`` at which OVF prunes (empty: plain GRPO).
        survivors: ``G_max = K_1 > K_2 > ... > K_{I+1} = K``, one more entry than ``checkpoints``; GRPO trains on
            the last, K >= 2 (a group std needs two rewards).
    """

    num_steps: int
    checkpoints: Tuple[int, ...]
    survivors: Tuple[int, ...]
    name: str = field(default="", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "checkpoints", tuple(self.checkpoints))
        object.__setattr__(self, "survivors", tuple(self.survivors))
        T = self.num_steps
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {T!r}")
        ts, ks = self.checkpoints, self.survivors
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ts):
            raise ValueError(f"checkpoints must be ints, got {ts!r}")
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in ks):
            raise ValueError(f"survivors must be ints, got {ks!r}")
        if any(not 0 < t < T for t in ts):
            raise ValueError(f"checkpoints must lie strictly between 0 and num_steps = {T}, got {ts}")
        if any(b <= a for a, b in zip(ts, ts[1:])):
            raise ValueError(f"checkpoints must be strictly increasing, got {ts}")
        if len(ks) != len(ts) + 1:
            raise ValueError(f"survivors must have one entry more than checkpoints (G_max, then the count after "
                             f"each checkpoint, ending at K): {len(ts)} checkpoints, got survivors {ks}")
        if any(b >= a for a, b in zip(ks, ks[1:])):
            raise ValueError(f"survivors must be strictly decreasing (each checkpoint prunes), got {ks}")
        if ks[-1] < 2:
            raise ValueError(f"survivors must end at K >= 2 (GRPO normalises over the K survivors), got {ks}")

    @classmethod
    def plain(cls, group_size: int, num_steps: int) -> "PruneSchedule":
        """Plain GRPO: ``group_size`` trajectories, no pruning."""
        return cls(num_steps, (), (group_size,), name=f"grpo-{group_size}")

    @classmethod
    def preset(cls, name: str) -> "PruneSchedule":
        """One of the paper's settings: "standard", "flash", "dance"."""
        if name not in PRESETS:
            raise ValueError(f"unknown Pro-GRPO preset {name!r}; known: {sorted(PRESETS)}")
        return PRESETS[name]

    @property
    def g_max(self) -> int:
        return self.survivors[0]

    @property
    def k(self) -> int:
        return self.survivors[-1]

    def active(self, step: int) -> int:
        """Trajectories that evaluate the model at ``step`` (before that step's pruning, if any)."""
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step must be in [0, {self.num_steps}), got {step}")
        return self.survivors[sum(t < step for t in self.checkpoints)]

    def survivors_after(self, step: int) -> int:
        """Trajectories that take ``step`` (after pruning at it, if it is a checkpoint)."""
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step must be in [0, {self.num_steps}), got {step}")
        return self.survivors[sum(t <= step for t in self.checkpoints)]

    def select(self, step: int, preview_rewards: torch.Tensor, *, impl: str = "auto") -> OVFSelection:
        """OVF at checkpoint ``step``: ``preview_rewards [P, active(step)]`` -> the survivors' indices [P, K_{i+1}]."""
        if step not in self.checkpoints:
            raise ValueError(f"step {step} is not a checkpoint of this schedule {self.checkpoints}")
        i = self.checkpoints.index(step)
        if preview_rewards.shape[-1] != self.survivors[i]:
            raise ValueError(f"preview_rewards must have {self.survivors[i]} rewards per group at step {step}, "
                             f"got shape {tuple(preview_rewards.shape)}")
        return ovf_select(preview_rewards, self.survivors[i + 1], impl=impl)


PRESETS: Dict[str, PruneSchedule] = {
    "standard": PruneSchedule(10, (5, 7), (48, 24, 12), name="standard"),
    "flash": PruneSchedule(10, (5, 7), (24, 16, 12), name="flash"),
    "dance": PruneSchedule(50, (30, 40), (48, 32, 8), name="dance"),
}
BASELINES: Dict[str, PruneSchedule] = {
    "standard": PruneSchedule.plain(24, 10),
    "flash": PruneSchedule.plain(24, 10),
    "dance": PruneSchedule.plain(16, 50),
}

# Pro-GRPO Table 4: TFLOPs of one epoch, and the per-call costs they were built from (SD3.5-M, 512 px).
TABLE4_TFLOPS = {"flow_grpo": 453474.18, "standard": 335626.82, "flash": 267365.79}


@dataclass(frozen=True)
class CostModel:
    """TFLOPs of one epoch of sampling and training (see the module docstring for every assumption)."""

    forward_tflops: float = 3.88
    vae_decode_tflops: float = 2.49
    reward_tflops: float = 0.34
    cfg: bool = True
    backward_factor: float = 2.0
    reference_kl: bool = True
    train_fraction: float = 0.99
    preview_forward: bool = False
    prompts: int = 48

    def __post_init__(self):
        for key in ("forward_tflops", "vae_decode_tflops", "reward_tflops", "backward_factor"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction!r}")
        if isinstance(self.prompts, bool) or not isinstance(self.prompts, int) or self.prompts < 1:
            raise ValueError(f"prompts must be an int >= 1, got {self.prompts!r}")

    def counts(self, schedule: PruneSchedule) -> Dict[str, int]:
        """Per prompt group: transformer forwards (sampling, previews), decodes+rewards, trained steps."""
        T = schedule.num_steps
        sampled = sum(schedule.survivors_after(s) for s in range(T))
        pruned_at = [schedule.survivors[i] - schedule.survivors[i + 1] for i in range(len(schedule.checkpoints))]
        previews = sum(schedule.survivors[:-1])
        preview_fwd = previews if self.preview_forward else sum(pruned_at)
        return {
            "sample_forwards": sampled,
            "preview_forwards": preview_fwd,
            "decodes": previews + schedule.k,
            "trained_steps": schedule.k * int(T * self.train_fraction),
        }

    def breakdown(self, schedule: PruneSchedule) -> Dict[str, float]:
        """TFLOPs per epoch by phase: sampling, previews, decode, reward, training, reference (and total)."""
        c = self.counts(schedule)
        fwd = self.forward_tflops * (2 if self.cfg else 1)  # one step of one trajectory
        n = self.prompts
        out = {
            "sampling": n * c["sample_forwards"] * fwd,
            "previews": n * c["preview_forwards"] * fwd,
            "decode": n * c["decodes"] * self.vae_decode_tflops,
            "reward": n * c["decodes"] * self.reward_tflops,
            "training": n * c["trained_steps"] * fwd * (1 + self.backward_factor),
            "reference": n * c["trained_steps"] * fwd if self.reference_kl else 0.0,
        }
        out["total"] = sum(out.values())
        return out

    def total(self, schedule: PruneSchedule) -> float:
        return self.breakdown(schedule)["total"]

    def speedup(self, schedule: PruneSchedule, baseline: Optional[PruneSchedule] = None) -> float:
        """FLOP ratio baseline / schedule (default baseline: the preset's plain-GRPO run)."""
        if baseline is None:
            if schedule.name not in BASELINES:
                raise ValueError("baseline is required for a schedule that is not a preset")
            baseline = BASELINES[schedule.name]
        return self.total(baseline) / self.total(schedule)


# The accounting that reproduces Table 4 (module docstring): previews as separate forwards, all T steps trained.
TABLE4_ACCOUNTING = replace(CostModel(), preview_forward=True, train_fraction=1.0)


# ------------------------------------------------------------------------------------------------ strategy


@dataclass
class ProGRPO(FlowGRPO):
    """Pro-GRPO on the one loop: Flow-GRPO's SDE and update, with expand-and-prune inside the sampler.

    ``algo_args``: ``schedule`` -- a preset name ("standard", "flash", "dance") or ``{checkpoints: [...],
    survivors: [...]}`` (`PruneSchedule`). The schedule's ``num_steps`` must equal ``sample.num_steps`` and its
    last survivor count ``sample.group_size`` (GRPO normalises over the K survivors). Each group starts G_max
    trajectories; at a checkpoint step the sampler has just evaluated every active trajectory's velocity ``v``, so
    the one-step ODE preview ``x0_hat = x_t - sigma_t * v`` costs no forward; the previews are decoded and scored,
    `ovf_select` keeps the next count per group, and the pruned trajectories take no further step (their earlier
    transitions are not trained: they have no final reward). ``survivors`` is logged per step.
    """

    name: str = "pro_grpo"
    schedule: Optional[PruneSchedule] = None
    ARGS: ClassVar[tuple] = ("schedule",)

    def configure(self, cfg) -> None:
        spec = cfg.algo_args.get("schedule")
        if spec is None:
            raise ValueError("algo_args.schedule is required for pro_grpo: a preset name "
                             f"({', '.join(sorted(PRESETS))}) or {{checkpoints: [...], survivors: [...]}}")
        if isinstance(spec, str):
            sched = PruneSchedule.preset(spec)
        elif isinstance(spec, dict) and set(spec) <= {"checkpoints", "survivors"}:
            try:
                sched = PruneSchedule(cfg.sample.num_steps, tuple(spec.get("checkpoints", ())),
                                      tuple(spec.get("survivors", ())))
            except ValueError as e:
                raise ValueError(f"algo_args.schedule: {e}") from e
        else:
            raise ValueError(f"algo_args.schedule must be a preset name or {{checkpoints, survivors}}, got {spec!r}")
        if sched.num_steps != cfg.sample.num_steps:
            raise ValueError(f"algo_args.schedule is for {sched.num_steps} steps but sample.num_steps is "
                             f"{cfg.sample.num_steps}")
        if sched.k != cfg.sample.group_size:
            raise ValueError(f"sample.group_size must be the schedule's final survivor count K = {sched.k}, "
                             f"got {cfg.sample.group_size}")
        self.schedule = sched

    def group_plan(self, num_steps, group_size, generator):
        return GroupPlan(roots=self.schedule.g_max, sde=torch.ones(num_steps, dtype=torch.bool),
                         same_noise=self.same_noise, pruned_to=self.schedule.k)

    def prune(self, ctx, step, rows):
        sched = self.schedule
        if step not in sched.checkpoints:
            if step == 0:
                self.record(survivors=[sched.g_max])
            return None
        x, v, group = rows["x"], rows["v"], rows["group"]
        sigma = float(ctx.sigmas[step])
        x0_hat = x - sigma * v  # one Euler step to sigma = 0 with the velocity already computed
        prompts = [rows["prompts"][g] for g in group.tolist()]
        bs = ctx.batch_size
        images = torch.cat([ctx.policy.decode(x0_hat[i:i + bs]) for i in range(0, x.shape[0], bs)])
        n_groups = int(group.max()) + 1
        active = sched.active(step)
        # a group-level reward (`fastgrpo.rewards.is_group_level`) compares each prompt's active rollouts
        grouped = getattr(ctx.reward, "has_group_level", False)
        preview, _ = ctx.reward(images, prompts, **({"group_sizes": [active] * n_groups} if grouped else {}))
        sel = sched.select(step, preview.view(n_groups, active).float())
        keep = (sel.indices + torch.arange(n_groups).unsqueeze(1) * active).reshape(-1)
        # The counts so far in this wave: G_max, then one per checkpoint passed (prune sees every step in order).
        self.record(survivors=list(sched.survivors[:sched.checkpoints.index(step) + 2]))
        return keep
