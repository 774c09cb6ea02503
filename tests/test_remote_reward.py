"""Rewards over HTTP (`fastgrpo.rewards.remote`): a real ``fastgrpo serve-reward`` process on localhost, training
through it, the server killed mid-run (the run stops naming the URL, its checkpoint intact, and resumes once the
server is back), and servers that answer garbage, the wrong number of scores, errors, or nothing."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import torch

from fastgrpo.rewards import brightness, build_reward
from fastgrpo.rewards.remote import RemoteReward, decode_batch, encode_batch
from fastgrpo.train import resolve_config, train
from fastgrpo.train.checkpoint import resumable_checkpoint
from fastgrpo.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
SMALL = ["sample.num_steps=3", "sample.prompts_per_step=2", "sample.group_size=4", "sample.batch_size=8",
         "log.progress=false", "log.tensorboard=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(config: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "fastgrpo", "serve-reward", str(config), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve-reward exited {proc.returncode}: {proc.stdout.read()}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return proc
        except requests.ConnectionError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("serve-reward did not answer within 120 s")


@pytest.fixture(scope="module")
def reward_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "reward.yaml"
    path.write_text("reward:\n  - {name: brightness, weight: 2.0}\n  - {name: colorfulness, weight: 0.5}\n")
    return path


@pytest.fixture(scope="module")
def server(reward_config):
    port = _free_port()
    proc = start_server(reward_config, port)
    yield f"http://127.0.0.1:{port}"
    proc.kill()
    proc.wait()


def quantised(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round() / 255


def test_png_round_trip_images_and_videos():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 5, 7, generator=g)
    assert torch.equal(decode_batch(encode_batch(images)), quantised(images))
    video = torch.rand(2, 4, 3, 6, 5, generator=g)
    assert torch.equal(decode_batch(encode_batch(video)), quantised(video))


def test_server_scores_as_the_rewards_do_in_process(server):
    """Batched over several requests in flight: the weighted sum of the served rewards, computed here in float64 on
    the same 8-bit images; /health names them."""
    assert requests.get(f"{server}/health", timeout=5).json() == {"rewards": ["brightness", "colorfulness"],
                                                                  "weights": [2.0, 0.5]}
    x = torch.rand(11, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    prompts = [f"p{i}" for i in range(11)]
    got = RemoteReward(server, batch_size=3, max_in_flight=3)(x, prompts)
    local = build_reward([{"name": "colorfulness"}])(quantised(x).double().float(), prompts)[0]
    want = 2.0 * brightness(quantised(x), prompts).double() + 0.5 * local.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert RemoteReward(server)(x[:0], []).shape == (0,)


def test_bad_requests_get_a_400_naming_the_problem(server):
    r = requests.post(f"{server}/score", json={"prompts": ["a"], "images": ["not a png"]}, timeout=5)
    assert r.status_code == 400 and "base64 PNGs" in r.json()["error"]
    r = requests.post(f"{server}/score", json={"prompts": ["a", "b"], "images": []}, timeout=5)
    assert r.status_code == 400 and "same length" in r.json()["error"]
    with pytest.raises(ValueError, match=r"refused the request \(HTTP 400"):
        RemoteReward(server)._post(["a"], ["not a png"])


@pytest.mark.slow  # ~25 s: two server starts and a 4-step run
def test_training_through_the_server_and_the_server_killed_mid_run(tmp_path, reward_config):
    """A tiny preset trains through a real server: its first step's rollouts are scored as the local rewards score
    their 8-bit images. Killed after the first step's checkpoint, the run stops with a ValueError naming the URL,
    metrics and checkpoint intact; with the server back, --resume finishes the run."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    remote = [f"reward=[{{name: remote, args: {{url: '{url}', timeout: 5, retries: 2, backoff: 0.1}}}}]"]
    local = train(resolve_config(preset="tiny-flow-grpo", overrides=[
        *SMALL, "train.steps=1", "reward=[{name: brightness, weight: 2.0}, {name: colorfulness, weight: 0.5}]"]),
        tmp_path / "local")
    proc = start_server(reward_config, port)
    out = tmp_path / "run"
    cfg = resolve_config(preset="tiny-flow-grpo", overrides=[*SMALL, "train.steps=4", "checkpoint.every=1", *remote])

    def kill_after_first_step():
        while not (out / "checkpoints/step_1/manifest.json").exists():
            time.sleep(0.05)
        proc.kill()

    killer = threading.Thread(target=kill_after_first_step, daemon=True)
    killer.start()
    try:
        with pytest.raises(ValueError, match=rf"reward server {url}/score unreachable after 3 attempts .*--resume"):
            train(cfg, out)
    finally:
        proc.kill()
        proc.wait()
    killer.join(5)
    rows = read_metrics(out / "metrics.jsonl")
    first_local = read_metrics(local / "metrics.jsonl")[0]["reward_mean"]
    assert abs(rows[0]["reward_mean"] - first_local) < 2e-3  # 8-bit images: within the quantisation
    done = rows[-1]["step"]
    assert resumable_checkpoint(out / "checkpoints").name == f"step_{done}"  # the last good state verifies
    proc = start_server(reward_config, port)
    try:
        train(cfg, out, resume=True)
    finally:
        proc.kill()
        proc.wait()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]


class _Fixed(BaseHTTPRequestHandler):
    """Answers every POST with the server's (status, body); counts the requests."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.hits += 1
        status, body = self.server.answer
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def fixed_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Fixed)
    srv.hits = 0
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()


@pytest.mark.parametrize("status, body, match, hits", [
    (200, "<html>oops</html>", r"answered something that is not a list of scores", 1),
    (200, json.dumps({"score": [1, 2]}), r"answered something that is not a list of scores \(KeyError", 1),
    (200, json.dumps({"scores": [0.5]}), r"answered 1 scores for 2 images", 1),
    (200, json.dumps({"scores": ["x", 1]}), r"answered something that is not a list of scores \(ValueError", 1),
    (500, json.dumps({"error": "CUDA out of memory"}), r"unreachable after 3 attempts \(last: HTTP 500", 3),
    (404, "{}", r"refused the request \(HTTP 404", 1),
])
def test_bad_answers_name_the_url(fixed_server, status, body, match, hits):
    fixed_server.answer = (status, body)
    url = f"http://127.0.0.1:{fixed_server.server_address[1]}"
    reward = RemoteReward(url, retries=2, backoff=0.01, timeout=5)
    with pytest.raises(ValueError, match=rf"reward server {url}/score {match}"):
        reward(torch.rand(2, 3, 4, 4), ["a", "b"])
    assert fixed_server.hits == hits  # retried only what may pass on retry (5xx), never a bad answer


def test_unreachable_server_and_bad_arguments():
    url = f"http://127.0.0.1:{_free_port()}"
    t0 = time.time()
    with pytest.raises(ValueError, match=rf"{url}/score unreachable after 2 attempts \(last: ConnectionError"):
        RemoteReward(url, retries=1, backoff=0.01, timeout=2)(torch.rand(1, 3, 4, 4), ["a"])
    assert time.time() - t0 < 10
    for kwargs, match in ((dict(url="localhost:8000"), "args.url must be an http"),
                          (dict(url="http://x", timeout=0), "args.timeout must be a number > 0"),
                          (dict(url="http://x", retries=-1), "args.retries must be a number > -1"),
                          (dict(url="http://x", batch_size=True), "args.batch_size must be a number > 0")):
        with pytest.raises(ValueError, match=match):
            build_reward([{"name": "remote", "args": kwargs}])


def test_serve_reward_refuses_bad_configs(tmp_path, capsys):
    from fastgrpo.cli import main

    assert main(["serve-reward", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "loop.yaml").write_text("reward: [{name: remote, args: {url: 'http://x:1'}}]\n")
    assert main(["serve-reward", str(tmp_path / "loop.yaml")]) == 2
    assert "cannot serve the remote reward" in capsys.readouterr().err
    (tmp_path / "none.yaml").write_text("train: {steps: 3}\n")
    assert main(["serve-reward", str(tmp_path / "none.yaml")]) == 2
    assert "no `reward:` list" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("reward: [{name: sharpness}]\n")
    assert main(["serve-reward", str(tmp_path / "bad.yaml")]) == 2
    assert "reward[0].name must be one of" in capsys.readouterr().err
