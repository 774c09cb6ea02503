"""Rewards served over HTTP: ``fastgrpo serve-reward CONFIG`` (the server) and the ``remote`` reward (its client).

A reward model too big for the training GPUs runs as a server elsewhere; training scores through it:

    fastgrpo serve-reward reward.yaml --port 8000          # reward.yaml: a `reward:` list, as in a training config
    reward: [{name: remote, args: {url: "http://host:8000"}}]

**Protocol** (JSON over HTTP, one request per batch):

* ``POST /score`` with ``{"prompts": [B strings], "images": [B base64 PNGs]}`` -- a video is a list of base64 PNG
  frames instead of one PNG -- answers ``{"scores": [B numbers], "components": {name: [B numbers]}}``; a bad
  request answers 400 with ``{"error": message}``, a reward that fails answers 500 with its message;
* ``GET /health`` answers ``{"rewards": [names], "weights": [...]}``.

Images travel as 8-bit PNG, so the server scores images quantised to 1/255 (as a reward model given saved images
does); the training loop's own rewards see the float images.

**Client** (`RemoteReward`): a batch is split into requests of ``batch_size`` images, up to ``max_in_flight`` of them
in flight at once (the loop already scores each micro-batch in a worker thread while the next one samples, so
scoring overlaps sampling). Each request has a ``timeout`` (seconds) and is retried up to ``retries`` times on a
connection error, a timeout or a 5xx answer, after ``backoff * 2**attempt`` seconds. A server that stays
unreachable stops the run with a ValueError naming the URL (the newest checkpoint on disk is the last good state,
as for a NaN reward); an answer that is not JSON, lacks ``scores``, or holds the wrong number of them is a
ValueError naming the URL at once (a server bug does not get better by retrying). A 4xx answer is not retried
either.

**Server** (`serve`): a Starlette app run by uvicorn (the standard ASGI server), one worker; requests are scored one
at a time on the server's device (a lock around the reward: a model on one GPU gains nothing from interleaving).
"""
from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# ------------------------------------------------------------------------------------------------ encoding


def encode_png(img: torch.Tensor) -> str:
    """One image [3, H, W] in [0, 1] as a base64 PNG (8 bits per channel)."""
    from PIL import Image

    arr = (img.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: str) -> torch.Tensor:
    """A base64 PNG as float32 [3, H, W] in [0, 1]."""
    from PIL import Image

    img = Image.open(io.BytesIO(base64.b64decode(data, validate=True))).convert("RGB")
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


def encode_batch(images) -> list:
    """[B, 3, H, W] -> B PNGs; videos [B, F, 3, H, W] -> B lists of F PNGs."""
    if images.dim() == 5:
        return [[encode_png(f) for f in video] for video in images]
    return [encode_png(img) for img in images]


def decode_batch(items: list) -> torch.Tensor:
    """The inverse of `encode_batch` (every image of a batch must have one size)."""
    if items and isinstance(items[0], list):
        return torch.stack([torch.stack([decode_png(f) for f in video]) for video in items])
    return torch.stack([decode_png(x) for x in items])


# -------------------------------------------------------------------------------------------------- client
class RemoteReward:
    """The ``remote`` reward: scores through a ``fastgrpo serve-reward`` server at ``url`` (see the module
    docstring). Output: the server's weighted reward, one number per image."""

    def __init__(self, url: str, *, timeout: float = 60.0, retries: int = 3, backoff: float = 1.0,
                 batch_size: int = 16, max_in_flight: int = 4):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"args.url must be an http:// or https:// URL of a `fastgrpo serve-reward` server, "
                             f"got {url!r}")
        for key, value, low in (("timeout", timeout, 0), ("backoff", backoff, -1), ("retries", retries, -1),
                                ("batch_size", batch_size, 0), ("max_in_flight", max_in_flight, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low:
                raise ValueError(f"args.{key} must be a number > {low}, got {value!r}")
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.batch_size, self.max_in_flight = int(batch_size), int(max_in_flight)
        self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="fastgrpo-remote-reward")
        self._local = threading.local()

    def _session(self):
        import requests

        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _post(self, prompts: list, payload: list) -> list:
        import requests

        where = f"{self.url}/score"
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                resp = self._session().post(where, json={"prompts": prompts, "images": payload}, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            if resp.status_code != 200:
                raise ValueError(f"reward server {where} refused the request (HTTP {resp.status_code}: "
                                 f"{resp.text[:300]})")
            try:
                scores = resp.json()["scores"]
                values = [float(s) for s in scores]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"reward server {where} answered something that is not a list of scores "
                                 f"({type(e).__name__}: {resp.text[:200]!r})") from None
            if len(values) != len(prompts):
                raise ValueError(f"reward server {where} answered {len(values)} scores for {len(prompts)} images")
            return values
        raise ValueError(f"reward server {where} unreachable after {self.retries + 1} attempts (last: {last}); the "
                         "newest checkpoint on disk is the last good state: start the server and resume with "
                         "`fastgrpo train --resume --out DIR`")

    def __call__(self, images, prompts) -> torch.Tensor:
        if not torch.is_tensor(images):
            raise ValueError("the remote reward takes image tensors [B, 3, H, W] (or videos [B, F, 3, H, W])")
        payload = encode_batch(images)
        futures = [self._pool.submit(self._post, list(prompts[i:i + self.batch_size]),
                                     payload[i:i + self.batch_size])
                   for i in range(0, len(payload), self.batch_size)]
        return torch.tensor([v for f in futures for v in f.result()], dtype=torch.float32)

    def __getstate__(self):  # the pool and sessions stay in this process
        state = dict(self.__dict__)
        state.pop("_pool"), state.pop("_local")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="fastgrpo-remote-reward")
        self._local = threading.local()


# -------------------------------------------------------------------------------------------------- server
def make_app(specs):
    """The Starlette app serving the rewards ``specs`` (``reward:`` items) on ``POST /score``, ``GET /health``."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from . import build_reward

    reward = build_reward(specs)
    names = [name for name, _, _ in reward.parts]
    if "remote" in names:
        raise ValueError("reward: a reward server cannot serve the remote reward (it would call itself or another "
                         "server); list the rewards to compute here")
    lock = threading.Lock()

    def score(prompts, images):
        with lock, torch.no_grad():
            total, comps = reward(images, prompts)
        return {"scores": [float(x) for x in total], "components": {k: [float(x) for x in v] for k, v in comps.items()}}

    async def score_route(request):
        try:
            body = await request.json()
            prompts, items = body["prompts"], body["images"]
            if not isinstance(prompts, list) or not isinstance(items, list) or len(prompts) != len(items):
                raise ValueError("prompts and images must be lists of the same length")
            if not all(isinstance(p, str) for p in prompts):
                raise ValueError("prompts must be strings")
        except (ValueError, KeyError, TypeError) as e:
            return JSONResponse({"error": f"bad request: {e}"}, status_code=400)
        if not items:
            return JSONResponse({"scores": [], "components": {}})
        try:
            images = await run_in_threadpool(decode_batch, items)
        except Exception as e:  # noqa: BLE001 - any undecodable image is the client's error
            return JSONResponse({"error": f"bad request: images must be base64 PNGs of one size ({e})"},
                                status_code=400)
        try:
            return JSONResponse(await run_in_threadpool(score, prompts, images))
        except Exception as e:  # noqa: BLE001 - the reward failed: the client retries a 5xx
            return JSONResponse({"error": f"{type(e).__name__}: {e}"}, status_code=500)

    async def health(request):
        return JSONResponse({"rewards": names, "weights": [w for _, w, _ in reward.parts]})

    return Starlette(routes=[Route("/score", score_route, methods=["POST"]), Route("/health", health)])


def load_reward_specs(path) -> list:
    """The ``reward`` list of a YAML file (a training config or a file holding just ``reward:``), validated."""
    from pathlib import Path

    from fastgrpo.train.config import load_yaml, _build, RewardSpec

    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"CONFIG {str(path)!r} does not exist (a YAML file with a `reward:` list)")
    data = load_yaml(path)
    specs = data.get("reward") if isinstance(data, dict) else None
    if isinstance(specs, dict):
        specs = [specs]
    if not isinstance(specs, list) or not specs:
        raise ValueError(f"{path}: no `reward:` list to serve (e.g. reward: [{{name: pickscore}}])")
    out = []
    for i, item in enumerate(specs):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: reward[{i}] must be a mapping, got {item!r}")
        out.append(_build(RewardSpec, item, f"reward[{i}]."))
    return [{"name": s.name, "weight": s.weight, "args": s.args} for s in out]


def serve(config, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Serve the rewards of ``config`` (a YAML path) until interrupted."""
    import uvicorn

    app = make_app(load_reward_specs(config))
    print(f"fastgrpo serve-reward: serving http://{host}:{port} (POST /score, GET /health)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, workers=1)
