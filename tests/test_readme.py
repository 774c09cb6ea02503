"""Every code snippet in README.md runs as written (issue 15).

* ``python`` blocks are executed, each in a fresh namespace.
* ``bash`` blocks are split into commands (continuation lines joined, comments dropped, ``&&`` chains split) and
  each command is handled by what it is; a command of a kind this file does not know fails the test, so a new
  snippet must be taught here:

  - ``fastgrpo presets | env | plot | demo`` run (``plot`` on a run folder made for it);
  - ``fastgrpo serve-reward CONFIG`` loads CONFIG's reward list (serving would block);
  - ``fastgrpo train ...`` runs with ``--dry-run`` appended: the config is resolved and validated (presets, config
    files, ``--set`` keys and values) without loading a model (a real run is the demo, `test_readme_demo`);
  - ``accelerate launch ...`` is parsed by accelerate's own parser, its ``--config_file`` must exist, and the
    fastgrpo command it starts is dry-run as above;
  - ``pytest bench/...`` lines name existing paths (CI runs every benchmark: ``pytest bench --benchmark-disable``);
  - ``bench/report.py`` / ``bench/gpu_probe.py`` lines parse with the scripts' own parsers, and every input file
    exists or is written by an earlier command of the same block;
  - install lines (``make``, ``python3 -m venv``, ``pip install``) are what ``make install`` / ``make test`` run,
    which CI runs on a clean checkout; ``mv`` moves what the previous command wrote.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def blocks(lang: str) -> list:
    """(line number, code) of every fenced block of ``lang`` in README.md."""
    text = README.read_text()
    out = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.S | re.M):
        if m.group(1) == lang:
            out.append((text[:m.start()].count("\n") + 1, m.group(2)))
    return out


def commands(code: str) -> list:
    """The argv of each command of a bash block."""
    joined = re.sub(r"\\\n", " ", code)
    out = []
    for line in joined.splitlines():
        argv = shlex.split(line, comments=True)
        while argv:
            if "&&" in argv:
                i = argv.index("&&")
                out.append(argv[:i])
                argv = argv[i + 1:]
            else:
                out.append(argv)
                argv = []
    return out


PYTHON_BLOCKS = blocks("python")
BASH_BLOCKS = blocks("bash")


def test_readme_has_snippets():
    assert len(PYTHON_BLOCKS) >= 4 and len(BASH_BLOCKS) >= 8


@pytest.mark.parametrize("line,code", PYTHON_BLOCKS, ids=[f"README.md:{n}" for n, _ in PYTHON_BLOCKS])
def test_python_snippet_runs(line, code, monkeypatch, tmp_path):
    from fastgrpo import families

    monkeypatch.setattr(families, "FAMILIES", dict(families.FAMILIES))  # a snippet may register a family
    monkeypatch.chdir(tmp_path)  # and write a run folder
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": f"readme_{line}"})


def _fastgrpo(argv: list) -> tuple[int, str, str]:
    from fastgrpo.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def _script_parser(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def _parse(parser, args: list, where: str):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{where}: {args} does not parse: {err.getvalue()}")


def _run_fastgrpo(argv: list, where: str) -> None:
    if argv[0] == "serve-reward":  # serving blocks: its arguments parse and its config's reward list loads
        from fastgrpo.rewards.remote import load_reward_specs

        config = argv[1] if Path(argv[1]).exists() else REPO / argv[1]
        assert load_reward_specs(config), where
        return
    if argv[0] == "train":
        argv = [*argv, "--dry-run"]
    rc, out, err = _fastgrpo(argv)
    assert rc == 0, f"{where}: fastgrpo {' '.join(argv)} exited {rc}: {err[-2000:]}"


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A working folder as a user has it after the README's earlier steps: a config file and a prompt list of
    their own, and a run folder to plot."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.yaml").write_text("train: {steps: 10}\n")
    (tmp_path / "my_prompts.txt").write_text("a red apple\na cat on a mat\n")
    run = tmp_path / "runs/x"
    run.mkdir(parents=True)
    rows = [{"step": s, "reward_mean": 0.4 + 0.01 * s, "reward_std": 0.1, "loss": 0.0, "kl": 0.0}
            for s in range(1, 9)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.yaml").write_text("algo: flow_grpo\nmodel: {family: sd3, path: tiny}\ntrain: {steps: 8}\n")
    return tmp_path


@pytest.mark.parametrize("line,code", BASH_BLOCKS, ids=[f"README.md:{n}" for n, _ in BASH_BLOCKS])
def test_bash_snippet(line, code, user_dir):
    written = set()  # files an earlier command of this block writes
    for argv in commands(code):
        where = f"README.md:{line}: {' '.join(argv)[:100]}"
        while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):  # environment assignments before the command
            argv = argv[1:]
        prog = Path(argv[0]).name
        if prog == "make" or prog == "pip" or argv[:3] == ["python3", "-m", "venv"] or prog == "mv":
            continue  # install lines: `make install` / `make test` run them in CI
        if prog == "fastgrpo":
            _run_fastgrpo(argv[1:], where)
        elif prog == "accelerate":
            from accelerate.commands.launch import launch_command_parser

            assert argv[1] == "launch", where
            ns = _parse(launch_command_parser(), argv[2:], where)
            if ns.config_file:
                assert (REPO / ns.config_file).is_file(), f"{where}: no {ns.config_file}"
            assert ns.module and ns.training_script == "fastgrpo", where
            _run_fastgrpo(ns.training_script_args, where)
        elif prog == "pytest":
            paths = [a.split("::")[0] for a in argv[1:] if not a.startswith("-") and "/" in a]
            keyword = [argv[i + 1] for i, a in enumerate(argv) if a == "-k"]
            assert paths and all((REPO / p).exists() for p in paths), where
            assert all(keyword), where
            written.update(a.split("=", 1)[1] for a in argv if a.startswith("--benchmark-json="))
        elif prog == "python" and argv[1] in ("bench/report.py", "bench/gpu_probe.py"):
            ns = _parse(_script_parser(argv[1]), argv[2:], where)
            if argv[1] == "bench/report.py":
                inputs = [*ns.results, *([ns.probe] if ns.probe else []), *([ns.readme] if ns.readme else [])]
                for f in inputs:
                    assert (REPO / f).exists() or f in written or Path(f).name in {Path(w).name for w in written} \
                        or f in _GPU_SESSION_FILES, f"{where}: {f} neither exists nor is written before"
                if ns.save_merged:
                    written.add(ns.save_merged)
            else:
                written.add(str(Path(ns.out) / "probe.json"))
        else:
            pytest.fail(f"{where}: a README command this test does not know how to check: teach tests/test_readme.py")


# What `bench/gpu_session.sh` writes on the GPU machine (the README's H200 block merges them).
_GPU_SESSION_FILES = {"kernels.json", "collector.json", "round.json"}


def test_gpu_session_writes_what_the_readme_merges():
    script = (REPO / "bench/gpu_session.sh").read_text()
    assert all(f in script for f in _GPU_SESSION_FILES)


def _fake_gpu_session(tmp_path, fail_on: str):
    """Run `bench/gpu_session.sh round` in a scratch tree where ``python3`` and ``nvidia-smi`` are stubs: the stub
    python exits 1 when its arguments contain ``fail_on`` (empty: never) and 0 otherwise."""
    import shutil
    import subprocess

    tree = tmp_path / "tree"
    (tree / "bench").mkdir(parents=True)
    (tree / "fastgrpo").mkdir()
    shutil.copy(REPO / "bench/gpu_session.sh", tree / "bench")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "nvidia-smi").write_text("#!/bin/sh\necho 'name, driver_version'\necho 'stub, 0'\n")
    (stubs / "python3").write_text(
        '#!/bin/sh\necho "$* | caches $TRITON_CACHE_DIR $TORCHINDUCTOR_CACHE_DIR" >> "$CALLS"\n'
        'case "$*" in *"$FAIL_ON"*) [ -n "$FAIL_ON" ] && exit 1;; esac\nexit 0\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "OUT": str(out), "FAIL_ON": fail_on,
           "CALLS": str(tmp_path / "calls.txt")}
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "round", "60"], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=120)
    return proc, (out / "log.txt").read_text(), (tmp_path / "calls.txt").read_text()


def test_gpu_session_keeps_compile_caches_in_the_checkout(tmp_path):
    """Every python the GPU session runs compiles into Triton's and Inductor's caches under the checkout's
    git-ignored ``.cache/``: the device machine keeps a checkout's ignored files between calls, so a rerun on the
    warm machine reuses what the first call compiled."""
    import subprocess

    proc, _, calls = _fake_gpu_session(tmp_path, "")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tree = tmp_path / "tree"
    lines = calls.splitlines()
    assert len(lines) > 5
    assert all(line.endswith(f"| caches {tree}/.cache/triton {tree}/.cache/inductor") for line in lines), lines
    assert (tree / ".cache/triton").is_dir() and (tree / ".cache/inductor").is_dir()
    # the caches stay out of git, and so out of what a `run` sends
    assert "/.cache/" in (REPO / ".gitignore").read_text().splitlines()
    if (REPO / ".git").exists():
        assert subprocess.run(["git", "check-ignore", "-q", ".cache/triton/x"], cwd=REPO).returncode == 0


@pytest.mark.parametrize("fail_on", ["", "gpu_probe.py --out", "test_bench_collector.py"])
def test_gpu_session_round_runs_every_part_and_exits_with_their_failures(tmp_path, fail_on):
    """`bench/gpu_session.sh round` goes on past a failing part (a loan's single call must bring back every
    measurement it can) and exits 1 naming the parts that failed, so the `run` result shows a failure at once."""
    proc, log, calls = _fake_gpu_session(tmp_path, fail_on)
    for part in ("test_bench_round.py", "test_bench_sde.py", "test_bench_collector.py", "--only collector ops",
                 "tests/test_sde_step.py", "--only token_tiles", "bench/report.py"):
        assert part in calls, part
    failed = {"": None, "gpu_probe.py --out": "probe", "test_bench_collector.py": "collector"}[fail_on]
    if failed is None:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "failed" not in log
    else:
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert f"failed parts: {failed} (rc 1)" in log and f"!! {failed} failed: rc 1" in log
        assert log.count("!! ") == 1


def test_gpu_image_check_pins_the_versions_the_readme_names():
    """`bench/gpu_image_check.sh` installs the versions the README says it checks against, and refuses an unknown
    step before it builds anything (exit 2, its usage)."""
    import subprocess

    script = REPO / "bench/gpu_image_check.sh"
    pins = re.search(r"^PINS=\((.*)\)$", script.read_text(), re.M).group(1).split()
    versions = dict(p.split("==") for p in pins)
    text = README.read_text()
    for name, label in (("torch", "torch"), ("triton", "Triton"), ("transformers", "transformers"),
                        ("accelerate", "accelerate"), ("huggingface_hub", "huggingface_hub"), ("numpy", "numpy")):
        assert f"{label} {versions[name]}" in text, (name, versions[name])
    proc = subprocess.run(["bash", str(script), "everything"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_presets_table_is_current():
    """The README's preset table is `fastgrpo presets --markdown` (regenerate it after adding or editing a preset)."""
    from fastgrpo.cli import presets_text

    text = README.read_text()
    section = re.search(r"<!-- presets:start -->\n(.*?)\n<!-- presets:end -->", text, re.S)
    assert section and section.group(1) == presets_text(markdown=True)


def test_families_table_lists_every_family_and_its_presets():
    """The README's model-family table has one row per row of `fastgrpo.families.FAMILIES`, naming every tiny
    preset of that family."""
    import yaml

    from fastgrpo.families import FAMILIES
    from fastgrpo.train.config import preset_paths

    section = re.search(r"<!-- families:start -->\n(.*?)\n<!-- families:end -->", README.read_text(), re.S)
    assert section
    rows = {m.group(1): line for line in section.group(1).splitlines() if (m := re.match(r"\| `(\w+)` \|", line))}
    assert set(rows) == set(FAMILIES)
    for name, path in preset_paths().items():
        family = (yaml.safe_load(Path(path).read_text()).get("model") or {}).get("family", "sd3")
        if name.startswith("tiny-"):
            assert f"`{name}`" in rows[family], (name, family)


def test_rewards_table_lists_every_reward():
    """Every reward of the registry is documented in the README's rewards table (inputs, output, rule), and the
    table names no reward that does not exist."""
    from fastgrpo.rewards import REWARDS

    section = re.search(r"<!-- rewards:start -->\n(.*?)\n<!-- rewards:end -->", README.read_text(), re.S)
    assert section
    names = [m.group(1) for line in section.group(1).splitlines() if (m := re.match(r"\| `(\w+)` \|", line))]
    assert sorted(names) == sorted(REWARDS)
