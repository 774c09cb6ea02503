"""The model-based rewards (geneval, ocr, vlm_judge, aesthetic) on tiny random models built here from configs and
loaded by path, their scoring rules against independent references on crafted inputs, and group-level rewards
(pairwise_brightness) scored per group by the trainer."""
import json
import os
import pickle
import random
import socket
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastgrpo.rewards import REWARDS, WeightedReward, build_reward, brightness, model_sources
from fastgrpo.rewards.pixel import PairwiseBrightness, as_pil_images


def _images(n=3, seed=0, h=20, w=24):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _cfg(*overrides):
    from fastgrpo.train import resolve_config

    return resolve_config(preset="tiny-flow-grpo", overrides=["log.progress=false", "log.tensorboard=false",
                                                              *overrides])


# ------------------------------------------------------------------------------------------ group-level rewards
def _pairwise_ref(b):
    """Win rate of each value against the others of its group (ties half), float64, by explicit loops."""
    n = len(b)
    if n == 1:
        return [0.5]
    return [sum(1.0 if b[i] > b[j] else 0.5 if b[i] == b[j] else 0.0 for j in range(n) if j != i) / (n - 1)
            for i in range(n)]


def test_pairwise_brightness_is_a_win_rate_within_each_group():
    x = _images(7, seed=3)
    x[5] = x[4]  # a tie
    sizes = [3, 1, 3]
    fn = build_reward([{"name": "pairwise_brightness"}, {"name": "brightness", "weight": 0.0}])
    assert fn.has_group_level
    total, parts = fn(x, ["p"] * 7, group_sizes=sizes)
    b = brightness(x).double().tolist()
    want = _pairwise_ref(b[:3]) + _pairwise_ref(b[3:4]) + _pairwise_ref(b[4:])
    torch.testing.assert_close(total.double(), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-7)
    assert set(parts) == {"pairwise_brightness", "brightness"}
    assert total[5] == total[4]  # the tie: one half each
    # one group of all seven is another reward: the groups are what it compares
    whole, _ = fn(x, ["p"] * 7, group_sizes=[7])
    assert not torch.equal(whole, total)
    with pytest.raises(ValueError, match="group-level.*group_sizes"):
        fn(x, ["p"] * 7)
    with pytest.raises(ValueError, match="sum to the 7 images"):
        fn(x, ["p"] * 7, group_sizes=[3, 3])
    # the per-image kind alone leaves it out
    t2, p2 = fn.sample_level(x, ["p"] * 7)
    assert set(p2) == {"brightness"} and torch.equal(t2, torch.zeros(7))


def test_collect_scores_hands_each_group_whole_across_micro_batches():
    """The loop's scoring of group-level rewards: micro-batches whose rows split groups (groups of 4 in
    micro-batches of 3, the autoregressive trainer's layout) are concatenated and cut at the group boundaries;
    a flow micro-batch's own group_sizes are used when given."""
    from fastgrpo.train.loop import GRPOTrainer, MicroBatch

    G = 4
    x = _images(12, seed=5)
    fn = build_reward([{"name": "pairwise_brightness", "weight": 2.0}, {"name": "brightness"}])
    trainer = SimpleNamespace(cfg=SimpleNamespace(sample=SimpleNamespace(group_size=G)), reward_fn=fn)
    trainer._score = lambda images, prompts: GRPOTrainer._score(trainer, images, prompts)
    trainer._check_finite = GRPOTrainer._check_finite
    b = brightness(x).double().tolist()
    want = torch.tensor([v for g in range(3) for v in _pairwise_ref(b[g * G:(g + 1) * G])], dtype=torch.float64)
    for sizes in (None, [[4], [4, 4]]):
        cuts = [0, 3, 6, 9, 12] if sizes is None else [0, 4, 12]
        batches, futures = [], []
        with ThreadPoolExecutor(1) as pool:
            for k, (a, e) in enumerate(zip(cuts, cuts[1:])):
                batches.append(MicroBatch([f"p{i // G}" for i in range(a, e)], {},
                                          group_sizes=None if sizes is None else sizes[k]))
                futures.append(pool.submit(trainer._score, x[a:e], batches[-1].prompts))
            GRPOTrainer.collect_scores(trainer, batches, futures)
        got = torch.cat([mb.rewards for mb in batches]).double()
        torch.testing.assert_close(got, 2 * want + torch.tensor(b, dtype=torch.float64), rtol=0, atol=1e-6)
        pair = torch.cat([mb.reward_parts["pairwise_brightness"] for mb in batches]).double()
        torch.testing.assert_close(pair, want, rtol=0, atol=1e-7)


def test_evaluation_and_serving_of_group_rewards():
    """Evaluation compares each prompt's samples_per_prompt images; a reward server, which receives
    micro-batches rather than groups, refuses a group-level reward when it starts."""
    from fastgrpo.rewards.remote import make_app
    from fastgrpo.train.evaluate import Evaluator

    ev = Evaluator.__new__(Evaluator)
    ev.trainer = SimpleNamespace(cfg=SimpleNamespace(eval=SimpleNamespace(samples_per_prompt=3)))
    ev.prompt_list = ["a", "b"]
    ev.prompts = ["a"] * 3 + ["b"] * 3
    ev.rewards = [("pairwise_brightness", 1.0, build_reward([{"name": "pairwise_brightness"}]))]
    x = _images(6, seed=9)
    b = brightness(x).double().tolist()
    got = ev.score(x)["pairwise_brightness"]
    torch.testing.assert_close(got, torch.tensor(_pairwise_ref(b[:3]) + _pairwise_ref(b[3:]), dtype=torch.float64),
                               rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="cannot serve group-level rewards \\(pairwise_brightness\\)"):
        make_app([{"name": "brightness"}, {"name": "pairwise_brightness"}])


def _round_rewards(out_dir, reward, *overrides):
    """One sampling round of the tiny flow preset: every rank's rewards (gathered) and parts of this rank. One
    process samples both groups in one micro-batch (batch_size 8), two processes one group each."""
    from fastgrpo.train import make_trainer

    cfg = _cfg("sample.num_steps=2", "sample.group_size=4", "sample.batch_size=8", "sample.prompts_per_step=2",
               "distributed.strategy=ddp", f"reward={reward}", *overrides)
    trainer = make_trainer(cfg, out_dir)
    with ThreadPoolExecutor(1) as pool:
        batches = trainer.sample(0, pool)
    rewards = trainer.advantages(batches)
    parts = {k: torch.cat([mb.reward_parts[k] for mb in batches]) for k in batches[0].reward_parts}
    return rewards, parts


GROUP_REWARD = "[{name: pairwise_brightness}, {name: brightness, weight: 0.0}]"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_worker(rank, world_size, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.save(_round_rewards(os.path.join(out_dir, f"r{rank}"), GROUP_REWARD),
                   os.path.join(out_dir, f"group_{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes (spawn): about 30 s here
def test_group_reward_is_the_same_on_one_and_two_processes(tmp_path):
    """The trainer hands a group-level reward each prompt's rollouts together: 1 and 2 processes (gloo) give
    identical rewards, equal to the win rates computed per group from the brightness part; comparing within a
    process's batch (Pref-GRPO's released layout: here one micro-batch of both groups in one process, one group
    per process in two) gives other numbers in one process."""
    import torch.multiprocessing as mp

    one, parts = _round_rewards(tmp_path / "single", GROUP_REWARD)
    mp.start_processes(_group_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    two = [torch.load(tmp_path / f"group_{r}.pt") for r in range(2)]
    assert torch.equal(two[0][0], one) and torch.equal(two[1][0], one)
    b = parts["brightness"].double().tolist()
    want = [v for g in range(2) for v in _pairwise_ref(b[4 * g:4 * g + 4])]
    torch.testing.assert_close(one.double(), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-7)
    # the rollouts are the same (to float32 rounding: 8 rows per forward in one process, 4 in each of two)
    torch.testing.assert_close(torch.cat([two[0][1]["brightness"], two[1][1]["brightness"]]), parts["brightness"])
    assert not torch.equal(one.double(), torch.tensor(_pairwise_ref(b), dtype=torch.float64))


def test_trainer_scores_a_group_reward_per_group(tmp_path):
    """One process, the real trainer: each rollout's reward is its win rate within its own group, though both
    groups are sampled (and scored) in one micro-batch."""
    rewards, parts = _round_rewards(tmp_path / "r", GROUP_REWARD)
    b = parts["brightness"].double().tolist()
    want = [v for g in range(2) for v in _pairwise_ref(b[4 * g:4 * g + 4])]
    torch.testing.assert_close(rewards.double(), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-7)
    assert len(set(b)) == 8  # the rollouts differ


# ------------------------------------------------------------------------------------------------- geneval
GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
     "prompt": "a photo of two clocks"},
    {"tag": "position", "include": [{"class": "kite", "count": 1},
                                    {"class": "wine glass", "count": 1, "position": ["above", 0]}],
     "prompt": "a photo of a wine glass above a kite"},
    {"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "green"},
                                      {"class": "apple", "count": 1, "color": "black"}],
     "prompt": "a photo of a green bus and a black apple"},
]


def _jsonl(path, lines):
    path.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
    return path


def test_geneval_jsonl_prompts_carry_metadata(tmp_path):
    from fastgrpo.rewards.geneval import MetaPrompt
    from fastgrpo.train.prompts import load_prompts

    f = _jsonl(tmp_path / "meta.jsonl", GENEVAL_LINES[:2] + [""] + GENEVAL_LINES[2:])
    prompts = load_prompts(str(f))
    assert prompts == [x["prompt"] for x in GENEVAL_LINES]
    assert all(isinstance(p, MetaPrompt) for p in prompts) and prompts[1].meta == GENEVAL_LINES[1]
    assert pickle.loads(pickle.dumps(prompts[2])).meta == GENEVAL_LINES[2]
    assert {prompts[0]: 1}["a photo of a bench"] == 1  # hashes and compares as its text
    bad = [
        ('{"prompt": "a", "include": [{"class": "cat", "count": 1}]', "not valid JSON"),
        ('{"tag": "single_object", "include": [{"class": "cat", "count": 1}]}', "non-empty \"prompt\""),
        ('{"prompt": "a", "include": [{"class": "cat", "count": 0}]}', r"include\[0\]: count must be an integer"),
        ('{"prompt": "a", "include": [{"class": "cat", "count": 1, "color": "teal"}]}', "color 'teal'"),
        ('{"prompt": "a", "include": [{"class": "cat", "count": 1, "position": ["above", 0]}]}', "position must be"),
        ('{"prompt": "a", "include": [{"class": "cat", "count": 1}], "exclude": [{"count": 2}]}', r"exclude\[0\]"),
        ('["a"]', "JSON object"),
    ]
    for line, msg in bad:
        f = _jsonl(tmp_path / "bad.jsonl", [GENEVAL_LINES[0], line])
        with pytest.raises(ValueError, match=rf"^prompts\.source: {f}:2: .*{msg}"):
            load_prompts(str(f))


def _relative_position_ref(a, b, t=0.1):
    """GenEval's relative_position (evaluate_images.py 140-157) written again in numpy."""
    boxes = np.array([a, b], dtype=np.float64).reshape(2, 2, 2)
    ca, cb = boxes.mean(axis=-2)
    da, db = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    off = ca - cb
    rev = np.maximum(np.abs(off) - t * (da + db), 0) * np.sign(off)
    if np.all(np.abs(rev) < 1e-3):
        return set()
    dx, dy = rev / np.linalg.norm(off)
    return {r for r, c in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                           ("below", dy > 0.5)) if c}


def test_geneval_position_and_selection_rules():
    from fastgrpo.rewards.geneval import box_iou, relative_position, select_objects

    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        a = [rng.uniform(0, 50), rng.uniform(0, 50)]
        a += [a[0] + rng.uniform(1, 30), a[1] + rng.uniform(1, 30)]
        b = [rng.uniform(0, 50), rng.uniform(0, 50)]
        b += [b[0] + rng.uniform(1, 30), b[1] + rng.uniform(1, 30)]
        got = relative_position(a, b)
        assert got == _relative_position_ref(a, b), (a, b)
        seen |= got
    assert seen == {"left of", "right of", "above", "below"}
    assert relative_position([0, 0, 10, 10], [0, 30, 10, 40]) == {"above"}  # image y grows downward
    assert box_iou([0, 0, 9, 9], [0, 0, 9, 9]) == 1.0 and box_iou([0, 0, 9, 9], [5, 0, 14, 9]) == 50 / 150
    boxes = [[0, 0, 9, 9], [1, 0, 10, 9], [30, 30, 40, 40], [0, 0, 5, 5], [50, 50, 60, 60]]
    scores = [0.5, 0.6, 0.4, 0.05, 0.9]
    labels = [0, 0, 0, 0, 1]
    got = select_objects(boxes, scores, labels, ["cat", "dog"], threshold=0.1)
    assert [s for _, s in got["cat"]] == [0.6, 0.5, 0.4] and [s for _, s in got["dog"]] == [0.9]
    got = select_objects(boxes, scores, labels, ["cat", "dog"], threshold=0.1, max_overlap=0.5, max_objects=2)
    assert [s for _, s in got["cat"]] == [0.6]  # 0.5 overlaps 0.6 (IoU 0.82); 0.4 is the 3rd best: cut first
    assert select_objects(boxes, scores, labels, ["cat", "dog"], threshold=0.95) == {}


def test_geneval_requirements_on_crafted_detections():
    from fastgrpo.rewards.geneval import evaluate

    def obj(x0, y0, x1, y1, s=0.9):
        return ([x0, y0, x1, y1], s)

    single, counting, position, color = (x for x in GENEVAL_LINES)
    assert evaluate(single, {"bench": [obj(0, 0, 5, 5)]}) == [True]
    assert evaluate(single, {"cat": [obj(0, 0, 5, 5)]}) == [False]
    assert evaluate(counting, {"clock": [obj(0, 0, 1, 1)] * 2}) == [True, True]
    assert evaluate(counting, {"clock": [obj(0, 0, 1, 1)] * 3}) == [True, False]  # three: the exclude fails
    assert evaluate(counting, {"clock": [obj(0, 0, 1, 1)]}) == [False, True]
    kite, glass_above, glass_below = obj(0, 40, 10, 50), obj(0, 0, 10, 10), obj(0, 60, 10, 70)
    assert evaluate(position, {"kite": [kite], "wine glass": [glass_above]}) == [True, True]
    assert evaluate(position, {"kite": [kite], "wine glass": [glass_below]}) == [True, False]
    assert evaluate(position, {"wine glass": [glass_above]}) == [False, False]  # no target: fails too
    colours = {"bus": ["green"], "apple": ["red"]}
    assert evaluate(color, {"bus": [obj(0, 0, 5, 5)], "apple": [obj(9, 9, 12, 12)]},
                    lambda cls, objs: colours[cls][:len(objs)]) == [True, False]


def test_geneval_flow_grpo_rule_on_crafted_detections():
    """Flow-GRPO's training rule (yifan123/reward-server reward_server/gen_eval.py, evaluate_reward), by hand."""
    from fastgrpo.rewards.geneval import flow_grpo_score

    def obj(x0, y0, x1, y1):
        return ([x0, y0, x1, y1], 0.9)

    single, counting, position, color = (x for x in GENEVAL_LINES)
    assert flow_grpo_score(single, {"bench": [obj(0, 0, 5, 5)]}) == (1.0, True)
    assert flow_grpo_score(single, {"bench": [obj(0, 0, 5, 5)] * 2}) == (0.0, False)  # exact count: 1 - 1/1
    assert flow_grpo_score(counting, {"clock": [obj(0, 0, 1, 1)] * 3}) == (0.5, False)  # 1 - 1/2; exclude unused
    assert flow_grpo_score(counting, {"clock": [obj(0, 0, 1, 1)] * 5}) == (-0.5, False)  # 1 - 3/2
    kite, above, below = obj(0, 40, 10, 50), obj(0, 0, 10, 10), obj(0, 60, 10, 70)
    assert flow_grpo_score(position, {"kite": [kite], "wine glass": [above]}) == (1.0, True)  # 1, 1, then 1
    # a failing pair appends 0 and then (as released) 1: credits [1, 1, 0, 1]
    assert flow_grpo_score(position, {"kite": [kite], "wine glass": [below]}) == (0.75, False)
    assert flow_grpo_score(position, {"wine glass": [above]}) == (1 / 3, False)  # [0, 1, 0]: target failed
    assert flow_grpo_score(position, {"kite": [kite]}) == (1 / 3, False)  # [1, 0, 0]: count off, one 0
    colours = {"bus": ["green"], "apple": ["red"]}
    got = flow_grpo_score(color, {"bus": [obj(0, 0, 5, 5)], "apple": [obj(9, 9, 12, 12)]},
                          lambda cls, objs: colours[cls][:len(objs)])
    assert got == (0.75, False)  # [1, 1, 1, 0]


def _tiny_clip(tmp_path, name="clip", proj=8):
    from fastgrpo.testing import tiny_clip_folder

    return tiny_clip_folder(tmp_path / name, max_length=32, projection_dim=proj)


def _tiny_owlvit(tmp_path):
    """A random OWL-ViT (OWLv2's image processor needs scipy or torchvision, absent here; the reward runs both)."""
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

    from fastgrpo.diffusion.tiny import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer(max_length=32)
    cfg = OwlViTConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=len(tok) - 2,
                         eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(1)
    OwlViTForObjectDetection(cfg).eval().save_pretrained(tmp_path / "owl")
    OwlViTProcessor(image_processor=OwlViTImageProcessor(size={"height": 32, "width": 32},
                                                         crop_size={"height": 32, "width": 32}),
                    tokenizer=tok).save_pretrained(tmp_path / "owl")
    return str(tmp_path / "owl")


def test_geneval_end_to_end_on_a_tiny_detector(tmp_path):
    from fastgrpo.rewards.geneval import COLORS, MetaPrompt

    owl = _tiny_owlvit(tmp_path)
    clip, clip_model, clip_proc = _tiny_clip(tmp_path)
    prompts = [MetaPrompt(x["prompt"], x) for x in GENEVAL_LINES]
    x = _images(4, seed=2, h=32, w=32)
    # threshold 0: every patch's box counts (the tiny model has 16): includes met, the counting exclude fails
    fn = build_reward([{"name": "geneval", "args": dict(model=owl, color_model=clip, device="cpu", threshold=0.0,
                                                         counting_threshold=0.0)}])
    total, parts = fn(x, prompts)
    assert total.shape == (4,) and set(parts) == {"geneval", "geneval_strict"}
    assert total[0] == 1.0 and parts["geneval_strict"][0] == 1.0  # single object: a bench is "found"
    assert total[1] == 0.5 and parts["geneval_strict"][1] == 0.0  # 16 clocks: >= 2 but not < 3
    assert ((total >= 0) & (total <= 1)).all() and torch.equal(parts["geneval_strict"], (total == 1).float())
    # the colour rule: CLIP zero-shot over GenEval's colours, checked against a direct computation
    reward = fn.parts[0][2]
    img = as_pil_images(x)[3]
    objs = [([2.0, 3.0, 20.0, 25.0], 0.9), ([0.0, 0.0, 31.0, 31.0], 0.8)]
    with torch.no_grad():
        texts = [t.format(c=c, cls="bus") for c in COLORS for t in
                 ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")]
        tx = clip_proc(text=texts, padding=True, return_tensors="pt")
        te = clip_model.get_text_features(**tx)
        te = getattr(te, "pooler_output", te).double()
        te = te / te.norm(dim=-1, keepdim=True)
        te = te.view(10, 3, -1).mean(1)
        te = te / te.norm(dim=-1, keepdim=True)
        px = clip_proc(images=[img.crop((2, 3, 20, 25)), img.crop((0, 0, 31, 31))], return_tensors="pt")
        ie = clip_model.get_image_features(pixel_values=px["pixel_values"])
        ie = getattr(ie, "pooler_output", ie).double()
        want = [COLORS[i] for i in (ie @ te.T).argmax(-1).tolist()]
    assert reward.colors(img, "bus", objs) == want
    # threshold above every score: nothing found, only the excludes hold
    strict = REWARDS["geneval"](model=owl, color_model=clip, device="cpu", threshold=1.0, counting_threshold=1.0,
                                strict=True)
    assert strict(x, prompts).tolist() == [0.0, 0.0, 0.0, 0.0]
    assert strict.last_stats["score"].tolist() == [0.0, 0.5, 0.0, 0.0]
    # metadata by prompt text from args.metadata; a prompt without metadata is a ValueError naming the way out
    meta = _jsonl(tmp_path / "geneval.jsonl", GENEVAL_LINES)
    by_text = REWARDS["geneval"](model=owl, color_model=clip, device="cpu", threshold=1.0, metadata=str(meta))
    assert by_text(x[:2], [x["prompt"] for x in GENEVAL_LINES[:2]]).tolist() == [0.0, 0.5]
    with pytest.raises(ValueError, match="has no GenEval metadata.*args.metadata"):
        by_text(x[:1], ["a photo of a unicorn"])
    with pytest.raises(ValueError, match="^model '/no/such/owl' does not exist"):
        REWARDS["geneval"](model="/no/such/owl")
    # Flow-GRPO's rule on the same detections: at threshold 0 the 16 boxes are far from the asked counts
    fg = REWARDS["geneval"](model=owl, color_model=clip, device="cpu", threshold=0.0, counting_threshold=0.0,
                            rule="flow_grpo")
    got = fg(x[:2], prompts[:2])
    assert got.tolist() == [1 - 15 / 1, 1 - 14 / 2] and fg.last_stats["strict"].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="rule must be"):
        REWARDS["geneval"](model=owl, rule="strict")


def test_geneval_metadata_reaches_the_reward_through_the_trainer(tmp_path):
    """A GenEval JSONL prompt source: the trainer samples its prompts and the geneval reward reads each one's
    metadata (threshold 0 on the tiny detector: single objects are found, the counting exclude fails)."""
    owl = _tiny_owlvit(tmp_path)
    meta = _jsonl(tmp_path / "geneval.jsonl", GENEVAL_LINES[:2])
    reward = json.dumps([{"name": "geneval", "args": {"model": owl, "color_model": None, "device": "cpu",
                                                      "threshold": 0.0, "counting_threshold": 0.0}}])
    rewards, parts = _round_rewards(tmp_path / "run", reward, f"prompts.source={meta}")
    assert sorted(rewards.tolist()) == [0.5] * 4 + [1.0] * 4  # one group per prompt
    assert sorted(parts["geneval_strict"].tolist()) == [0.0] * 4 + [1.0] * 4


def test_geneval_owlv2_boxes_scale_with_the_longer_side(tmp_path):
    """An OWLv2 detector (OWL-ViT's processor stands in: OWLv2's needs scipy or torchvision, absent here): boxes are
    relative to the image padded to a square, so both axes scale by the longer side; OWL-ViT's by width/height."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    from fastgrpo.rewards.geneval import select_objects

    owl = _tiny_owlvit(tmp_path)
    cfg = Owlv2Config.from_pretrained(owl)
    torch.manual_seed(2)
    Owlv2ForObjectDetection(Owlv2Config(text_config=cfg.text_config.to_dict(),
                                        vision_config=cfg.vision_config.to_dict(),
                                        projection_dim=16)).eval().save_pretrained(tmp_path / "owl2")
    import shutil

    for f in os.listdir(owl):
        if not f.startswith(("config", "model")):
            shutil.copy(os.path.join(owl, f), tmp_path / "owl2" / f)
    for path, kind in ((str(tmp_path / "owl2"), "owlv2"), (owl, "owlvit")):
        fn = REWARDS["geneval"](model=path, color_model=None, device="cpu")
        fn._load()
        assert fn._kind == kind
        img = as_pil_images(_images(1, seed=8, h=20, w=30))[0]  # W 30, H 20
        got = fn.detect(img, ["cat", "dog"], threshold=0.0)
        with torch.no_grad():
            inputs = fn._processor(text=[["a photo of a cat", "a photo of a dog"]], images=[img], return_tensors="pt")
            out = fn._model(**inputs)
        cx, cy, w, h = out.pred_boxes[0].double().unbind(-1)
        sx, sy = (30.0, 30.0) if kind == "owlv2" else (30.0, 20.0)
        boxes = torch.stack([(cx - w / 2) * sx, (cy - h / 2) * sy, (cx + w / 2) * sx, (cy + h / 2) * sy], -1)
        best = out.logits[0].double().max(-1)
        want = select_objects(boxes, torch.sigmoid(best.values), best.indices, ["cat", "dog"], threshold=0.0)
        assert got.keys() == want.keys() and sum(len(v) for v in got.values()) == 16
        for c in want:  # (near-equal scores of the random model may swap places: compare sorted)
            np.testing.assert_allclose(sorted(b for b, _ in got[c]), sorted(b for b, _ in want[c]), atol=1e-4)
            np.testing.assert_allclose(sorted(s for _, s in got[c]), sorted(s for _, s in want[c]), rtol=1e-5)


# ------------------------------------------------------------------------------------------------- ocr
def _levenshtein_ref(a, b):
    """Edit distance by the recursive definition (memoised)."""
    from functools import lru_cache

    @lru_cache(None)
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


def test_ocr_rule_is_flow_grpos():
    from fastgrpo.rewards.ocr import edit_distance, ocr_score, quoted_text

    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 9)))
        b = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 9)))
        assert edit_distance(a, b) == _levenshtein_ref(a, b)
        if b.replace(" ", ""):
            ra, rb = a.replace(" ", "").lower(), b.replace(" ", "").lower()
            d = 0 if rb in ra else min(_levenshtein_ref(ra, rb), len(rb))
            assert ocr_score(a, b) == pytest.approx(1 - d / len(rb))
    assert ocr_score("Hello World", "hello world") == 1.0  # case and spaces do not count
    assert ocr_score("xx HELLO yy", "hello") == 1.0  # contained: distance 0
    assert ocr_score("helo", "hello") == pytest.approx(0.8)
    assert ocr_score("completely unrelated text", "hi") == 0.0  # capped at the target's length
    assert ocr_score("", "abcd") == 0.0
    assert quoted_text('a sign that says "Open 24h" at night') == "Open 24h"
    assert quoted_text('a lone "quote here') == "quote here"  # Flow-GRPO's split('"')[1]
    with pytest.raises(ValueError, match="double quotes"):
        quoted_text("a sign")
    with pytest.raises(ValueError, match="empty text"):
        quoted_text('a sign saying " "')


def _tiny_trocr(tmp_path):
    from transformers import (TrOCRConfig, TrOCRProcessor, ViTConfig, ViTImageProcessor, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel)

    from fastgrpo.diffusion.tiny import tiny_t5_tokenizer

    tok = tiny_t5_tokenizer(max_length=16)
    enc = ViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    image_size=32, patch_size=8)
    dec = TrOCRConfig(vocab_size=len(tok), d_model=16, decoder_layers=1, decoder_attention_heads=2,
                      decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                      eos_token_id=1, decoder_start_token_id=1)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 1, 0, 1
    torch.manual_seed(3)
    model = VisionEncoderDecoderModel(config=cfg).eval()
    with torch.no_grad():  # make the random decoder write characters (not end at once): favour 'a'..'z' tokens
        model.decoder.output_projection.weight[0:3] = 0
    proc = TrOCRProcessor(image_processor=ViTImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    model.save_pretrained(tmp_path / "ocr")
    proc.save_pretrained(tmp_path / "ocr")
    return str(tmp_path / "ocr"), model, proc


def test_ocr_end_to_end_on_a_tiny_trocr(tmp_path):
    from fastgrpo.rewards.ocr import ocr_score

    path, model, proc = _tiny_trocr(tmp_path)
    fn = REWARDS["ocr"](model=path, device="cpu", max_new_tokens=6)
    x = _images(3, seed=4)
    prompts = ['a sign "ab c"', 'a "HELLO" sign', 'neon "xyz"']
    got = fn(x, prompts)
    with torch.no_grad():
        px = proc(images=as_pil_images(x), return_tensors="pt").pixel_values
        ids = model.generate(pixel_values=px, do_sample=False, num_beams=1, max_new_tokens=6)
        read = proc.batch_decode(ids, skip_special_tokens=True)
    assert fn.last_read == read and any(read)  # the tiny model reads something
    assert got.tolist() == pytest.approx([ocr_score(r, t) for r, t in zip(read, ["ab c", "HELLO", "xyz"])])
    assert ((got >= 0) & (got <= 1)).all()
    with pytest.raises(ValueError, match="double quotes"):
        fn(x[:1], ["no quotes here"])
    with pytest.raises(ValueError, match="^model '/no/such/trocr' does not exist"):
        REWARDS["ocr"](model="/no/such/trocr")


# ------------------------------------------------------------------------------------------------- vlm judge
def test_vlm_judge_parses_answers_robustly():
    from fastgrpo.rewards.vlm import fill_missing, parse_score

    cases = {
        "The image matches well.\nFinal Score: 4": 4.0,
        "final score: 3.5": 3.5,
        "**Final Score:** 5": 5.0,
        "Final Score 2": 2.0,
        "Alignment 2/5 ... Final Score: 1\nwait, Final Score: 4.25": 4.25,  # the last verdict
        "Final Score: 7": None,  # off the 1-5 scale
        "Final Score: 0": None,
        "Final Score: -3": None,
        "I rate it 4 out of 5": None,  # no "Final Score": not guessed
        "assign a score from 1 to 5 after 'Final Score:'": None,
        "": None,
        None: None,
        "Final Score: NaN": None,
    }
    for text, want in cases.items():
        assert parse_score(text) == want, text
    r, bad = fill_missing([4.0, None, 2.0, None])
    assert r.tolist() == pytest.approx([0.8, 0.6, 0.4, 0.6]) and bad.tolist() == [0, 1, 0, 1]
    r, bad = fill_missing([None, None])
    assert r.tolist() == pytest.approx([0.6, 0.6]) and torch.isfinite(r).all()
    r, _ = fill_missing([5.0, None], missing=0.0)
    assert r.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="missing must be"):
        REWARDS["vlm_judge"](model="org/judge", missing="median")


def _tiny_qwen25_vl(tmp_path):
    """A random Qwen2.5-VL with a character-level tokenizer and a minimal chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessor)

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
               "<|video_pad|>", "<unk>"]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({s: len(chars) + i for i, s in enumerate(special)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<|endoftext|>",
                                  eos_token="<|im_end|>", additional_special_tokens=special[1:7])
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}"
                "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                "{% endif %}")
    ip = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2,
                               temporal_patch_size=2)
    ids = tok.convert_tokens_to_ids
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=28, out_hidden_size=32,
                           fullatt_block_indexes=[0]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(cfg).eval().save_pretrained(tmp_path / "vlm")
    try:
        import torchvision  # noqa: F401  (the Qwen2.5-VL processor's video half needs it)
    except ImportError:
        from transformers.processing_utils import ProcessorMixin

        check = ProcessorMixin.check_argument_for_proper_class
        ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: (
            type(arg) if arg is None else check(self, name, arg))
        try:
            proc = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, chat_template=template)
        finally:
            ProcessorMixin.check_argument_for_proper_class = check
        return str(tmp_path / "vlm"), proc, False
    proc = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, chat_template=template)
    proc.save_pretrained(tmp_path / "vlm")
    return str(tmp_path / "vlm"), proc, True


def test_vlm_judge_end_to_end_on_a_tiny_qwen25_vl(tmp_path, monkeypatch):
    """The tiny judge writes garbage: every answer is malformed, scores the fill value (finite), and the count
    reaches the log as a part. The model loads from its folder; the processor too where torchvision is installed
    (without it transformers cannot build a Qwen2.5-VL processor from a folder: it is handed over instead)."""
    path, proc, saved = _tiny_qwen25_vl(tmp_path)
    if not saved:
        import transformers

        monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained",
                            classmethod(lambda cls, where, **kw: proc if where == path else None))
    fn = build_reward([{"name": "vlm_judge", "args": dict(model=path, device="cpu", dtype="float32",
                                                           max_new_tokens=6, image_size=28, batch_size=2)}])
    x = _images(3, seed=6)
    total, parts = fn(x, ["a cat", "a red dog", "x"])
    judge = fn.parts[0][2]
    assert len(judge.last_answers) == 3 and total.shape == (3,) and torch.isfinite(total).all()
    assert parts["vlm_judge_malformed"].tolist() == [1.0, 1.0, 1.0] and judge.malformed_total == 3
    assert total.tolist() == pytest.approx([0.6] * 3)
    # a well-formed answer is parsed (the model's answers replaced by crafted ones)
    monkeypatch.setattr(judge, "answers", lambda images, prompts: ["Final Score: 5", "nonsense", "Final Score: 2"])
    total, parts = fn(x, ["a", "b", "c"])
    assert total.tolist() == pytest.approx([1.0, 0.7, 0.4]) and judge.malformed_total == 4
    assert judge.answered_total == 6


# ------------------------------------------------------------------------------------------------- aesthetic
def _laion_shaped_head(d):
    """LAION's improved-aesthetic-predictor MLP layout (Linear, Dropout, ..., Linear(16, 1)) with input size d."""
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Linear(d, 12), torch.nn.Dropout(0.2), torch.nn.Linear(12, 10),
                               torch.nn.Dropout(0.2), torch.nn.Linear(10, 6), torch.nn.Dropout(0.1),
                               torch.nn.Linear(6, 16), torch.nn.Linear(16, 1)).eval()


def test_aesthetic_head_on_normalised_clip_embeddings(tmp_path):
    from safetensors.torch import save_file

    clip, clip_model, clip_proc = _tiny_clip(tmp_path, proj=8)
    mlp = _laion_shaped_head(8)
    state = {f"layers.{k}": v for k, v in mlp.state_dict().items()}
    torch.save(state, tmp_path / "head.pth")
    save_file(state, str(tmp_path / "head.safetensors"))
    x = _images(3, seed=7)
    with torch.no_grad():
        px = clip_proc(images=as_pil_images(x), return_tensors="pt")["pixel_values"]
        e = clip_model.get_image_features(pixel_values=px)
        e = getattr(e, "pooler_output", e).double()
        want = mlp.double()(e / e.norm(dim=-1, keepdim=True)).squeeze(1)
    for head in ("head.pth", "head.safetensors"):
        got = REWARDS["aesthetic"](model=clip, head=str(tmp_path / head), device="cpu")(x, ["p"] * 3)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.save({"weight": torch.randn(1, 8), "bias": torch.zeros(1)}, tmp_path / "linear.pth")  # LAION v1 form
    assert REWARDS["aesthetic"](model=clip, head=str(tmp_path / "linear.pth"), device="cpu")(x, None).shape == (3,)
    torch.save(_laion_shaped_head(5).state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="takes 5-d embeddings"):
        REWARDS["aesthetic"](model=clip, head=str(tmp_path / "wrong.pth"), device="cpu")(x, None)
    with pytest.raises(ValueError, match="^head '/no/such/head.pth' does not exist"):
        REWARDS["aesthetic"](model=clip, head="/no/such/head.pth")
    with pytest.raises(ValueError, match="^head: give"):
        REWARDS["aesthetic"](model=clip)


# --------------------------------------------------------------------------------------- bad input up front
def test_bad_reward_config_names_the_key(tmp_path, monkeypatch):
    from fastgrpo.train.loop import check_model_sources

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    head = tmp_path / "h.pth"
    head.write_bytes(b"")
    for name in ("geneval", "ocr", "vlm_judge", "aesthetic"):
        args = {"head": str(head)} if name == "aesthetic" else {}
        given = json.dumps({"name": name, "args": {**args, "model": "./nowhere"}})
        with pytest.raises(ValueError, match=r"^reward\[1\]\.args\.model '\./nowhere' does not exist"):
            check_model_sources(_cfg(f"reward=[{{name: brightness}}, {given}]"))
        default = json.dumps({"name": name, "args": args})
        with pytest.raises(ValueError, match=rf"^reward\[0\]\.args\.model '.+' is not in the local Hugging Face "
                                             rf"cache.*\({name}'s default\)$"):
            check_model_sources(_cfg(f"reward=[{default}]"))
    with pytest.raises(ValueError, match=r"^reward\[0\]\.args\.head is required"):
        check_model_sources(_cfg("reward=[{name: aesthetic}]"))
    with pytest.raises(ValueError, match=r"^reward\[0\]\.args\.head 'missing\.pth' does not exist"):
        check_model_sources(_cfg("reward=[{name: aesthetic, args: {head: missing.pth}}]"))
    with pytest.raises(ValueError, match=r"^reward\[0\]\.args\.metadata 'meta\.jsonl' does not exist"):
        check_model_sources(_cfg("reward=[{name: geneval, args: {metadata: meta.jsonl}}]"))
    assert model_sources("geneval", {"model": "org/owl"}) == {
        "model": "org/owl", "processor": "org/owl", "color_model": "openai/clip-vit-large-patch14"}
    assert model_sources("geneval", {"color_model": None}) == {  # no colour model: nothing to check
        "model": "google/owlv2-base-patch16-ensemble", "processor": "google/owlv2-base-patch16-ensemble"}
    with pytest.raises(ValueError, match=r"reward\[0\]\.name must be one of .*got 'gen_eval'"):
        _cfg("reward=[{name: gen_eval}]")
    with pytest.raises(ValueError, match="reward 'pairwise_brightness': .*unexpected keyword argument 'model'"):
        build_reward([{"name": "pairwise_brightness", "args": {"model": "x"}}])
    assert isinstance(build_reward([{"name": "brightness"}]), WeightedReward)
    assert isinstance(REWARDS["pairwise_brightness"](), PairwiseBrightness)


def test_rewards_refuse_prompts_they_cannot_score_before_anything_loads(tmp_path):
    """GenEval without metadata and the editing rewards without source images stop the run at its start (naming
    prompts.source and the reward), not at the first scoring after the model has loaded."""
    from fastgrpo.train import make_trainer, resolve_config

    small = ["sample.num_steps=2", "sample.prompts_per_step=2", "sample.group_size=2", "log.progress=false",
             "log.tensorboard=false"]
    for reward, match in (("{name: geneval, args: {model: " + str(tmp_path) + ", color_model: null}}",
                           "has no GenEval metadata"),
                          ("{name: source_similarity}", "needs prompts with source images"),
                          ("{name: clip_image_similarity, args: {model: " + str(tmp_path) + "}}",
                           "needs prompts with source images")):
        cfg = resolve_config(preset="tiny-flow-grpo", overrides=[*small, f"reward=[{reward}]"])
        with pytest.raises(ValueError, match=rf"prompts.source: reward '\w+' cannot score these prompts: .*{match}"):
            make_trainer(cfg, tmp_path / "run")
        assert not (tmp_path / "run" / "config.yaml").exists()
