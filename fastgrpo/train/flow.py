"""The flow-matching family's phases (SD3/SD3.5, FLUX): tree-shaped SDE rollouts and the per-transition update.

**sample** -- the strategy plans this rank's groups (`Strategy.plan_groups`), then they are sampled in waves of
whole groups (as many as fit ``sample.batch_size`` rows at the widest point), each wave scored in a worker thread
while the next one samples. Within a wave every group follows its `GroupPlan`: ``roots`` trajectories from noise
(or, from step ``start`` on, from the given ``x_start``: a prefix sampled elsewhere joins the wave there); at a
split step each active trajectory becomes that many children, each taking the step with its own noise; stochastic
steps call `fastgrpo.sde_step` with the variant's kind, the others ``kind="ode"``; after each velocity evaluation
the strategy may prune rows (Pro-GRPO). Rows stay ordered by group, so a group's leaves are contiguous and its
size is its number of leaves (``MicroBatch.group_sizes``). Forwards run in chunks of at most ``sample.batch_size``
rows. Every stochastic transition is kept (x_t, x_{t-1}, its log-prob, its node of the tree); ODE transitions have
no density and are never trained.

**train** -- the trained transitions (per node: the strategy's steps for trees without splits, every stochastic
transition otherwise) in chunks of ``sample.batch_size``: the transition's new log-prob and the KL to the reference
in one fused ``sde_step(prev_sample=..., v_ref=...)`` call, the clipped surrogate ``max(-A r, -A clip(r, 1-e,
1+e))`` (Flow-GRPO's ``policy_loss``) times the strategy's weight, plus ``beta * kl``, averaged over all trained
transitions; gradients accumulate over the chunks. A transition's advantage is its node's (`Strategy.
node_advantages`: the leaf's, or BranchGRPO's depth-wise one).

With plain GRPO and G a multiple of the batch size, the training chunks are the sampling chunks of each step, so the
importance ratio is exactly 1 on the first inner step (``first_ratio_dev`` in the log).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from fastgrpo.ops import sde_step

from .distributed import all_sum, step_generator
from .loop import GRPOTrainer, MicroBatch, TrainingDiverged


@dataclass
class Tree:
    """One wave's rollouts: nodes (trajectory segments between splits) and their stochastic transitions."""

    parent: list = field(default_factory=list)
    depth: list = field(default_factory=list)
    group: list = field(default_factory=list)
    train_steps: dict = field(default_factory=dict)  # node -> set of steps it trains (trees without splits)
    transitions: list = field(default_factory=list)  # dicts: step, node [m], x, x_next, log_prob [m], std [m]
    leaf_nodes: torch.Tensor | None = None

    @property
    def num_nodes(self) -> int:
        return len(self.parent)

    def add_nodes(self, parents, depth, groups) -> torch.Tensor:
        start = len(self.parent)
        self.parent += list(parents)
        self.depth += list(depth)
        self.group += list(groups)
        return torch.arange(start, len(self.parent))

    def leaves_of(self, node: int) -> list:
        """Leaf positions (indices into ``leaf_nodes``) below ``node``."""
        out = []
        for pos, leaf in enumerate(self.leaf_nodes.tolist()):
            n = leaf
            while n != -1 and n != node:
                n = self.parent[n]
            if n == node:
                out.append(pos)
        return out


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
            model.full_finetune(keep_reference=self.strategy.beta > 0 or self.strategy.needs_reference)
            self.parallel.shard(model.transformer, reference=model.frozen_reference)
        self.sigmas = model.sigmas(cfg.sample.num_steps)
        return model, model.trainable_state()

    # ------------------------------------------------------------------------------------------------ sample
    def velocity(self, x, step_idx, emb, rows_group, *, cfg=True, transformer=None):
        """v for rows ``x`` at steps ``step_idx`` [n] (int), prompt embeddings per group, in batch-size chunks."""
        bs = self.cfg.sample.batch_size
        out = []
        for i in range(0, x.shape[0], bs):
            sl = slice(i, i + bs)
            e = {k: v[rows_group[sl]] for k, v in emb.items()}
            out.append(self.policy.velocity(x[sl], self.sigmas[step_idx[sl]], e, cfg=cfg, transformer=transformer))
        return torch.cat(out) if out else x.new_empty(x.shape)

    @torch.no_grad()
    def sample(self, step: int, gen: torch.Generator, pool: ThreadPoolExecutor) -> list:
        cfg, strat = self.cfg, self.strategy
        prompt_idx, _ = self.sampler.local(step, self.rank, self.world_size)
        group_idx = prompt_idx[::cfg.sample.group_size].tolist()
        group_prompts = [self.prompts[i] for i in group_idx]
        self.wave_log = {}
        plans = strat.plan_groups(self, step, group_idx, gen)
        widest = max(max(p.roots, p.leaves()) for p in plans)
        per_wave = max(1, cfg.sample.batch_size // widest)
        batches, futures = [], []
        waves = range(0, len(group_prompts), per_wave)
        for w in tqdm(waves, desc="sample", leave=False, disable=not (cfg.log.progress and self.is_main)):
            prompts, wave_plans = group_prompts[w:w + per_wave], plans[w:w + per_wave]
            first_group = self.rank * len(group_prompts) + w  # global group index, for group-shared noise
            tree, x_final = self._rollout(prompts, wave_plans, gen, step, first_group)
            leaf_groups = tree_groups(tree)
            leaf_prompts = [prompts[g] for g in leaf_groups]
            sizes = torch.bincount(torch.tensor(leaf_groups), minlength=len(prompts)).tolist()
            batches.append(MicroBatch(leaf_prompts, {"tree": tree, "prompts": prompts,
                                                     "emb": self.policy.encode_prompts(prompts)}, group_sizes=sizes))
            futures.append(self.submit_score(pool, self.policy.decode(x_final), leaf_prompts))
        self.collect_scores(batches, futures)
        self.samples += all_sum(sum(max(p.roots, p.leaves()) for p in plans))
        return batches

    def _rollout(self, prompts, plans, gen, step, first_group):
        cfg, strat, model = self.cfg, self.strategy, self.policy
        T = cfg.sample.num_steps
        emb = model.encode_prompts(prompts)
        tree = Tree()
        for g, plan in enumerate(plans):
            if not 0 <= plan.start < T or (plan.start > 0 and plan.x_start is None):
                raise ValueError(f"{strat.name}: a group plan starts at step {plan.start} "
                                 f"{'without x_start' if 0 < plan.start < T else f'outside [0, {T})'}")
        x = torch.empty(model.latent_shape(0), device=self.device)
        group = node = torch.empty(0, dtype=torch.long)
        sigma_max = self.sigmas[1].item()
        for i in range(T):
            joining = [g for g, plan in enumerate(plans) if plan.start == i]
            if joining:
                x, group, node = self._add_roots(tree, joining, plans, (x, group, node), gen, step, first_group)
            if x.shape[0] == 0:
                continue
            factors = torch.tensor([plans[g].splits.get(i, 1) for g in group.tolist()])
            if bool((factors > 1).any()):
                x, group, parent = (x.repeat_interleave(factors.to(x.device), 0), group.repeat_interleave(factors),
                                    node.repeat_interleave(factors))
                node = tree.add_nodes(parent.tolist(), [tree.depth[p] + 1 for p in parent.tolist()], group.tolist())
            steps = torch.full((x.shape[0],), i)
            v = self.velocity(x, steps, emb, group)
            keep = strat.prune(self, i, {"x": x, "v": v, "group": group, "prompts": prompts, "emb": emb})
            if keep is not None:
                x, v, group, node = x[keep], v[keep], group[keep], node[keep]
            sde = torch.tensor([bool(plans[g].sde[i]) for g in group.tolist()])
            x_next = torch.empty_like(x)
            s, sn = self.sigmas[i].item(), self.sigmas[i + 1].item()
            if bool(sde.any()):
                scale = strat.noise_scale(i, plans[int(group[sde][0])])
                noise = None if scale == 1.0 else scale * torch.randn(x[sde].shape, generator=gen).to(x.device)
                out = sde_step(x[sde], v[sde], s, sn, kind=strat.sde_kind, noise_level=strat.noise_level,
                               sigma_max=sigma_max, generator=gen, noise=noise)
                x_next[sde] = out.prev_sample
                tree.transitions.append({"step": i, "node": node[sde], "x": x[sde], "x_next": out.prev_sample,
                                         "log_prob": out.log_prob, "std": out.std})
            if bool((~sde).any()):
                x_next[~sde] = sde_step(x[~sde], v[~sde], s, sn, kind="ode").prev_sample
            x = x_next
        tree.leaf_nodes = node
        return tree, x

    def _add_roots(self, tree, joining, plans, rows, gen, step, first_group):
        """Start the roots of the groups ``joining`` (from initial noise, or their plan's ``x_start``) and add them
        to the active ``rows`` (x, group, node), which stay ordered by group."""
        model, T = self.policy, self.cfg.sample.num_steps
        xs, groups = [], []
        for g in joining:
            plan = plans[g]
            if plan.x_start is not None:
                x0 = plan.x_start.to(self.device, torch.float32)
                xs.append(x0.expand(plan.roots, *x0.shape[1:]).clone())
            elif plan.same_noise:
                x0 = model.initial_latents(1, step_generator(self.cfg.seed, step, 1000 + first_group + g))
                xs.append(x0.expand(plan.roots, *x0.shape[1:]).clone())
            else:
                xs.append(model.initial_latents(plan.roots, gen))
            groups += [g] * plan.roots
        new_group = torch.tensor(groups)
        new_node = tree.add_nodes([-1] * len(groups), [0] * len(groups), groups)
        for g in joining:  # trees without splits train the strategy's steps per trajectory
            if not plans[g].splits:
                roots = new_node[new_group == g]
                for n, s in zip(roots.tolist(), self.strategy.train_steps(T, len(roots), gen).tolist()):
                    tree.train_steps[n] = set(s)
        x, group, node = rows
        x, group, node = torch.cat([x, *xs]), torch.cat([group, new_group]), torch.cat([node, new_node])
        order = torch.sort(group, stable=True).indices
        return x[order], group[order], node[order]

    # ------------------------------------------------------------------------------------------------- train
    def _trained_rows(self, batches):
        """All trained transitions of this step: x, x_next, step, old log-prob, advantage, weight, group, wave."""
        strat = self.strategy
        cols = {k: [] for k in ("x", "x_next", "step", "old", "adv", "weight", "group", "wave")}
        for w, mb in enumerate(batches):
            tree = mb.data["tree"]
            node_adv = strat.node_advantages(tree, mb.rewards, mb.advantages.cpu())
            for tr in tree.transitions:
                nodes = tr["node"].tolist()
                # Trained: the node's planned steps (trees without splits) or every stochastic transition; never a
                # node without an advantage (a trajectory pruned before the end).
                mask = torch.tensor([(tr["step"] in tree.train_steps[n] if n in tree.train_steps else True)
                                     and not bool(torch.isnan(node_adv[n])) for n in nodes], dtype=torch.bool)
                if not bool(mask.any()):
                    continue
                steps = torch.full((int(mask.sum()),), tr["step"])
                weights = strat.step_weights(tr["std"][mask].cpu(), steps, self.sigmas)
                cols["x"].append(tr["x"][mask])
                cols["x_next"].append(tr["x_next"][mask])
                cols["step"].append(steps)
                cols["old"].append(tr["log_prob"][mask])
                cols["adv"].append(node_adv[tr["node"][mask]])
                cols["weight"].append(weights if weights is not None else torch.ones(len(steps)))
                cols["group"].append(torch.tensor([tree.group[n] for n in tr["node"][mask].tolist()]))
                cols["wave"].append(torch.full((len(steps),), w))
        return {k: torch.cat(v) for k, v in cols.items()}

    def train(self, batches: list, gen: torch.Generator) -> dict:
        cfg, model, strat = self.cfg, self.policy, self.strategy
        beta, clip = strat.beta, cfg.train.clip_range
        sigma_max = self.sigmas[1].item()
        rows = self._trained_rows(batches)
        n = rows["step"].shape[0]
        bs = cfg.sample.batch_size
        self.parallel.check_same_forwards(-(-n // bs))
        if n == 0:
            raise ValueError(f"{strat.name}: no transition is trained (check train.timestep_fraction and the plan)")
        model.transformer.train()
        stats = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "ratio_mean": 0.0, "clip_frac": 0.0}
        first_ratio_dev = None
        for start in tqdm(range(0, n, bs), desc="train", leave=False,
                          disable=not (cfg.log.progress and self.is_main)):
            sl = slice(start, start + bs)
            x_t, x_next, j = rows["x"][sl], rows["x_next"][sl], rows["step"][sl]
            waves = rows["wave"][sl]
            emb = {k: torch.cat([batches[int(w)].data["emb"][k][rows["group"][sl][waves == w]]
                                 for w in waves.unique_consecutive()]) for k in batches[0].data["emb"]}
            s, sn = self.sigmas[j].to(self.device), self.sigmas[j + 1].to(self.device)
            v = model.velocity(x_t, s, emb, cfg=cfg.train.cfg)
            v_ref = None
            if beta > 0:
                with torch.no_grad(), model.reference() as ref_net:
                    v_ref = model.velocity(x_t, s, emb, cfg=cfg.train.cfg, transformer=ref_net)
            out = sde_step(x_t, v, s.double(), sn.double(), kind=strat.sde_kind, noise_level=strat.noise_level,
                           sigma_max=sigma_max, prev_sample=x_next, v_ref=v_ref)
            ratio = torch.exp(out.log_prob - rows["old"][sl].to(self.device))
            if first_ratio_dev is None:
                first_ratio_dev = (ratio.detach() - 1).abs().max().item()
            adv = rows["adv"][sl].to(self.device)
            surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
            policy = (rows["weight"][sl].to(self.device) * surrogate).sum()
            kl = out.kl.sum() if out.kl is not None else torch.zeros((), device=self.device)
            loss = (policy + beta * kl) / n
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"the loss became {loss.item()} at denoising steps {j.tolist()}; "
                                       "weights not updated")
            loss.backward()
            stats["loss"] += loss.item()
            stats["policy_loss"] += policy.item() / n
            stats["kl"] += kl.item() / n
            stats["ratio_mean"] += ratio.detach().sum().item() / n
            stats["clip_frac"] += ((ratio.detach() - 1).abs() > clip).float().sum().item() / n
        model.transformer.eval()
        stats["first_ratio_dev"] = first_ratio_dev
        stats["trained_transitions"] = all_sum(n)
        stats.update(getattr(self, "wave_log", {}))
        return stats


def tree_groups(tree: Tree) -> list:
    """The group of each leaf, in leaf order."""
    return [tree.group[n] for n in tree.leaf_nodes.tolist()]
