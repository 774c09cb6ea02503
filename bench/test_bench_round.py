"""One whole Flow-GRPO round, our fast path against the eager path the public trainers run.

A round is one optimizer step of `fastgrpo.train` (``GRPOTrainer.round``): sample G rollouts for each of P prompts
with CFG (SDE steps), decode, score, advantages, one training pass over the trained transitions with the KL to the
reference (adapters disabled), clip and AdamW step. Three trainers are built in turn from the same seed and config:

* ``eager``: ``model.impl=torch`` (every op the plain-PyTorch reference), no compile, no CUDA graphs -- what the
  released trainers run;
* ``fast_nocompile``: ``model.impl=auto`` (our kernels), ``sample.cuda_graphs=true`` (on CUDA);
* ``fast``: the same plus ``model.compile=true`` (regional torch.compile of the transformer blocks).

On CUDA the transformer is SD3.5-Medium's (24 joint blocks, 24 heads x 64, dual attention in blocks 0-12; random
bf16 weights, 2.24 B parameters) with SD3's VAE, at 512 px (1024 image tokens) with 333 text tokens (77 CLIP + 256
T5), LoRA r = 32 on the joint-attention projections, Flow-GRPO's settings (10 steps, CFG 4.5, a = 0.7, KL beta 0.01,
the first 99% of the steps trained); P = 2 prompts x G = 4 rollouts in chunks of 8 (16 rows with CFG). On CPU the
tiny random SD3 pipeline runs the same rounds as a correctness check (CI; there the fast paths use the C++ ops).

Before a fast path is timed, it is compared with the eager path: its step-0 rollouts (same initial and SDE noise:
rewards, final latents) and the gradient of one training pass over the eager path's rollouts (identical inputs;
without the PPO clip for that pass, since Flow-GRPO's clip range of 1e-4 turns rounding-level differences of the
first-step ratio into different gradients). With bf16 weights other kernels round differently, and the SDE
trajectories amplify that over the steps, hence the tolerances below. A path beyond a tolerance is still timed (a
GPU session is short; its numbers and the differences are written, and bench/report.py marks its speed-up as not
comparable), and the test fails after every path has run.
Recorded in ``extra_info``: per path images/s, seconds per phase (sample incl. decode and scoring, advantages,
train, optimizer), peak memory, warm-up time (compilation, graph capture; split into the step-0 probe, the
compared training pass and the warm-up round) and what the path compiled (Dynamo graphs, frames, graph breaks,
Inductor's cache hits and misses, seconds compiling: none on the eager and no-compile paths, checked), MFU
(transformer FLOPs of the round, counted with ``torch.utils.flop_counter`` on one sampling and one training chunk,
per second, over the bf16 GEMM rate measured in the same test, 8192^3 on CUDA), and ``speedup_vs_eager`` of the
last path. With ``FASTGRPO_ROUND_PARTIAL=FILE`` the results so far are written after each path
(bench/gpu_session.sh uses it so that a run stopped at its time limit keeps the finished paths);
``FASTGRPO_ROUND_COMPILE=0`` skips the compiled path.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from harness import HAS_CUDA, device_name, driver_version, _version

P, G = 2, 4
ROUNDS = 2 if HAS_CUDA else 1  # timed rounds per path (after one warm-up round each)
REWARD_RTOL = 5e-2 if HAS_CUDA else 1e-4
LATENT_RTOL = 5e-2 if HAS_CUDA else 1e-4
GRAD_RTOL = 5e-2 if HAS_CUDA else 1e-3  # relative L2 distance of the whole gradient, on identical rollouts
TOLERANCES = {"rewards_rel_l2": REWARD_RTOL, "latents_rel_l2": LATENT_RTOL, "grad_rel_l2": GRAD_RTOL}
COMPILE = os.environ.get("FASTGRPO_ROUND_COMPILE", "1") != "0"


def _config(fast_ops: bool, compiled: bool, graphs: bool, device: torch.device):
    from fastgrpo.train.config import config_from_dict

    real = device.type == "cuda"
    data = {
        "algo": "flow_grpo", "seed": 0,
        "model": {"family": "sd3", "path": "tiny", "dtype": "bfloat16" if real else "float32",
                  "height": 512 if real else 32, "width": 512 if real else 32,
                  "max_sequence_length": 256 if real else 32,
                  "lora": {"rank": 32 if real else 4, "alpha": 64 if real else 8},
                  "compile": compiled, "impl": "auto" if fast_ops else "torch"},
        "sample": {"num_steps": 10 if real else 4, "guidance_scale": 4.5, "noise_level": 0.7,
                   "prompts_per_step": P, "group_size": G, "batch_size": P * G, "cuda_graphs": graphs and real},
        "train": {"steps": 1000, "lr": 3e-4, "beta": 0.01, "clip_range": 1e-4, "adv_clip": 5.0,
                  "timestep_fraction": 0.99, "adv_std": "global"},
        "reward": [{"name": "brightness", "weight": 1.0}],
        "log": {"tensorboard": False, "progress": False},
    }
    return config_from_dict(data)


def _pipeline(device):
    from fastgrpo.diffusion.tiny import random_sd3_pipeline, tiny_sd3_pipeline

    if device.type == "cuda":
        return random_sd3_pipeline(device=device, dtype=torch.bfloat16)
    return tiny_sd3_pipeline(0)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Path:
    """A trainer and its timed rounds."""

    def __init__(self, name, cfg, device, tmp):
        from fastgrpo.train.run import make_trainer

        self.name, self.device = name, device
        self.trainer = make_trainer(cfg, tmp / name, device=device, pipeline=_pipeline(device))
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.step = 0
        self.times, self.phases, self.rows = [], [], []

    def round(self, timed=True):
        phases = {}
        _sync(self.device)
        t0 = time.perf_counter()
        row = self.trainer.round(self.step, self.pool, phase_times=phases)
        _sync(self.device)
        dt = time.perf_counter() - t0
        self.step += 1
        if timed:
            self.times.append(dt)
            self.phases.append(phases)
        self.rows.append(row)
        return row

    def probe(self):
        """Step 0's rollouts at the initial weights (the same noise on both paths): (batches with advantages,
        rewards [P*G], final latents)."""
        batches = self.trainer.sample(0, self.pool)
        self.trainer.advantages(batches)
        rewards = torch.cat([mb.rewards.float().cpu() for mb in batches])
        x = torch.cat([mb.data["tree"].transitions[-1]["x_next"].float().cpu() for mb in batches])
        return batches, rewards, x

    def gradient(self, batches) -> torch.Tensor:
        """The trainable weights' gradient (flattened, float64, CPU) of one training pass over ``batches`` without
        the PPO clip (clip range 1e9 for this pass only: Flow-GRPO's 1e-4 clips on rounding-level differences of the
        first-step ratio, which would make the comparison a test of rounding), weights untouched."""
        tr = self.trainer
        clip = tr.cfg.train.clip_range
        tr.cfg.train.clip_range = 1e9
        try:
            tr.optimizer.zero_grad(set_to_none=True)
            tr.train(batches)
            grad = torch.cat([p.grad.detach().double().flatten().cpu() for p in tr.params])
        finally:
            tr.cfg.train.clip_range = clip
            tr.optimizer.zero_grad(set_to_none=True)
        return grad

    def close(self):
        self.pool.shutdown()


def _gemm_tflops(device):
    n = 8192 if device.type == "cuda" else 512
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 10 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def _round_flops(trainer):
    """Transformer FLOPs of one round: one sampling chunk's forward and one training chunk's forward + backward
    (+ the reference forward) counted by torch's FLOP counter, times the round's numbers of chunks."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg, model = trainer.cfg, trainer.policy
    bs = cfg.sample.batch_size
    x = torch.randn(model.latent_shape(bs), device=trainer.device)
    emb = model.encode_prompts([trainer.prompts[0]] * bs)
    sigma = torch.full((bs,), 0.5, device=trainer.device)
    forwards = model.model_forwards
    with FlopCounterMode(display=False) as fwd, torch.no_grad():
        model.velocity(x, sigma, emb)
    model.transformer.train()
    with FlopCounterMode(display=False) as train:
        model.velocity(x, sigma, emb).square().mean().backward()
    model.transformer.eval()
    trainer.optimizer.zero_grad(set_to_none=True)
    model.model_forwards = forwards
    T = cfg.sample.num_steps
    sample_chunks = T * -(-P * G // bs)
    trained = int(cfg.train.timestep_fraction * T) * P * G
    train_chunks = -(-trained // bs)
    per_round = sample_chunks * fwd.get_total_flops() + train_chunks * (train.get_total_flops()
                                                                        + fwd.get_total_flops())
    return per_round, fwd.get_total_flops(), train.get_total_flops()


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _phase_medians(phases):
    return {k: _median([p[k] for p in phases]) for k in phases[0]}


def _write_partial(info: dict) -> None:
    """With FASTGRPO_ROUND_PARTIAL=FILE, the results so far as a one-benchmark pytest-benchmark JSON (what
    bench/report.py reads), rewritten after each path: a run killed at its time limit keeps the finished paths."""
    path = os.environ.get("FASTGRPO_ROUND_PARTIAL")
    if path:
        import datetime
        import json

        Path(path).write_text(json.dumps({"datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                                          "benchmarks": [{"name": "test_round", "params": {},
                                                          "stats": {"median": info.get("median_s")},
                                                          "extra_info": info}]}, indent=1))


# name -> (fast ops, compiled blocks, CUDA graphs); timed in this order, the eager path first.
PATHS = {"eager": (False, False, False), "fast_nocompile": (True, False, True), "fast": (True, COMPILE, True)}


def test_round(benchmark, bench_device, tmp_path):
    """Each path: build, probe step 0's rollouts, one warm-up round (compilation, graph capture), ROUNDS timed
    rounds; the fast paths are compared with the eager one before they are timed (and the test fails at the end
    if one is beyond a tolerance). pytest-benchmark times the last path's rounds; every path's numbers are in
    extra_info["paths"]."""
    import gc

    device = bench_device
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny model on a shared 2-core box: one thread is fastest
    info = {"device": device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
            "driver": driver_version(), "torch": torch.__version__, "triton": _version("triton"),
            "diffusers": _version("diffusers"), "cuda": torch.version.cuda, "images_per_round": P * G,
            "paths": {}}
    eager = None
    disagreements, compile_problems = [], []
    info["tolerances"] = dict(TOLERANCES)
    names = list(PATHS) if COMPILE else ["eager", "fast_nocompile"]
    for name in names:
        fast_ops, compiled, graphs = PATHS[name]
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        path = _Path(name, _config(fast_ops, compiled, graphs, device), device, tmp_path)
        compile_before = _compile_totals()
        t0 = time.perf_counter()
        batches, rewards, latents = path.probe()  # compiles the no-grad blocks, captures the sampling graphs
        t1 = time.perf_counter()
        if eager is None:
            eager = {"batches": batches, "rewards": rewards, "latents": latents}
            eager["grad"] = path.gradient(batches)
        # The training pass on the eager path's rollouts (identical inputs); compiles the training graphs.
        grad = eager["grad"] if name == "eager" else path.gradient(eager["batches"])
        del batches
        t2 = time.perf_counter()
        path.round(timed=False)  # warm-up round
        warmup_s = time.perf_counter() - t0
        res = {"warmup_s": warmup_s, "warmup_parts_s": {"probe": t1 - t0, "gradient": t2 - t1,
                                                        "round": warmup_s - (t2 - t0)},
               "first_ratio_dev": path.rows[0]["first_ratio_dev"],
               "compiled_blocks": path.trainer.policy.compiled_blocks}
        if "shape" not in info:
            info["shape"] = _shape(path.trainer)
            flops = _round_flops(path.trainer)  # eager modules: the counter sees every op
            info.update(transformer_flops_per_round=flops[0], forward_flops_per_chunk=flops[1],
                        train_flops_per_chunk=flops[2])
        if name != "eager":  # the same round as the eager path, before any timing
            agreement = {
                "rewards_rel_l2": float((rewards - eager["rewards"]).norm() / eager["rewards"].norm()),
                "latents_rel_l2": float((latents - eager["latents"]).norm() / eager["latents"].norm()),
                "grad_rel_l2": float((grad - eager["grad"]).norm() / eager["grad"].norm()),
            }
            beyond = [f"{key} {agreement[key]:.1e} >= {tol:g}" for key, tol in TOLERANCES.items()
                      if not agreement[key] < tol]  # NaN is beyond too
            res["agreement"] = {**agreement, "beyond_tolerance": beyond}
            if beyond:  # still timed (GPU time is scarce), reported as not comparable, and the test fails below
                disagreements.append((name, beyond))
        if name == names[-1]:
            benchmark.pedantic(path.round, rounds=ROUNDS, warmup_rounds=0, iterations=1)
        while len(path.times) < ROUNDS:  # the other paths, or --benchmark-disable
            path.round()
        graphed = path.trainer.graphed
        res["compile"] = _compile_since(compile_before)
        # the eager and no-compile paths compile nothing (what the released trainers run); the compiled path
        # traces its blocks whole (checked at the end, after every path has been timed)
        if (res["compile"]["graphs"] > 0) != bool(compiled) or res["compile"]["graph_breaks"]:
            compile_problems.append((name, res["compile"]))
        res.update(round_s=_median(path.times), round_times_s=path.times, phases_s=_phase_medians(path.phases),
                   images_per_s=P * G / _median(path.times),
                   peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                   cuda_graphs={"captured": len(graphed.graphs), "failed": graphed.failed,
                                "replays": graphed.replays} if graphed is not None else None)
        info["paths"][name] = res
        path.close()
        del path, graphed
        gc.collect()
        if "gemm_tflops" not in info:
            info["gemm_tflops"] = _gemm_tflops(device)
        for r in info["paths"].values():
            r["mfu"] = info["transformer_flops_per_round"] / r["round_s"] / (info["gemm_tflops"] * 1e12)
        last = info["paths"][name]
        info.update(fast_path=name, median_s=last["round_s"], images_per_s=last["images_per_s"],
                    speedup_vs_eager=info["paths"]["eager"]["round_s"] / last["round_s"])
        _write_partial(info)
    benchmark.extra_info.update(info)
    assert not disagreements, f"fast paths that do not agree with the eager one: {disagreements}"
    assert not compile_problems, f"paths that compiled when they should not, or not whole: {compile_problems}"


def _compile_totals() -> dict:
    """Dynamo's and Inductor's running totals in this process: graphs compiled, frames (compile attempts: more
    than the graphs when a frame recompiles), graph breaks, Inductor's cache hits and misses, and seconds spent
    compiling (the forward frames, and the backward graphs AOTAutograd compiles at their first backward)."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    return {"graphs": counters["stats"]["unique_graphs"], "frames": counters["frames"]["total"],
            "graph_breaks": sum(counters["graph_break"].values()),
            # Inductor's on-disk cache (bench/gpu_session.sh keeps it for a rerun): hits skip code generation
            "fxgraph_cache_hits": counters["inductor"]["fxgraph_cache_hit"],
            "fxgraph_cache_misses": counters["inductor"]["fxgraph_cache_miss"],
            "compile_s": sum(sum(compilation_time_metrics.get(key, ()))
                             for key in ("_compile.compile_inner", "backward._backward_impl"))}


def _compile_since(before: dict) -> dict:
    """What one path compiled: `_compile_totals` now, less ``before`` (recorded per path: on a GPU the compiled
    path's warm-up is mostly compilation, and these say how many graphs it took)."""
    return {key: value - before[key] for key, value in _compile_totals().items()}


def _shape(trainer):
    tcfg, cfg = trainer.policy.transformer.config, trainer.cfg
    text = trainer.policy.encode_prompts([trainer.prompts[0]])["embeds"].shape[1]
    return {"layers": tcfg.num_layers, "heads": tcfg.num_attention_heads, "head_dim": tcfg.attention_head_dim,
            "latent": list(trainer.policy.latent_shape(1))[1:], "image_tokens": (tcfg.sample_size // tcfg.patch_size) ** 2,
            "text_tokens": text, "params": sum(p.numel() for p in trainer.policy.transformer.parameters()),
            "prompts": P, "group_size": G, "batch_size": cfg.sample.batch_size, "num_steps": cfg.sample.num_steps,
            "lora_rank": cfg.model.lora.rank, "dtype": cfg.model.dtype}
