"""deploy/Dockerfile read as instructions (no docker here): pinned bases, non-root, no secrets.

It must also agree with the manifests that run it: the uid the pods run as, the repo path the
RayJob entrypoints use, and the files it copies must exist.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from tests.deploy.test_config_files import IMAGE_REPO_DIR, K8S_FILES, SECRET_NAME, documents, pod_templates

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a line continuation"
    return out


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)


def parsed(text: str) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Instructions and the ARG defaults (what ``${NAME}`` means when no --build-arg is given)."""
    steps = instructions(text)
    defaults = {}
    for keyword, args in steps:
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults[name] = value
    return steps, defaults


def dockerfile_problems(text: str) -> list[str]:
    """Unpinned base images, a root or missing USER, secrets in ARG/ENV/COPY (empty = fine)."""
    steps, args = parsed(text)
    problems = []
    stages = set()
    for keyword, value in steps:
        if keyword != "FROM":
            continue
        words = substitute(value, args).split()
        tag = words[0].rpartition("/")[2].partition(":")[2]
        pinned = "@sha256:" in words[0] or (tag and tag != "latest" and "$" not in tag)
        if words[0] not in stages and not pinned:
            problems.append(f"FROM {words[0]}: not pinned to a tag or digest")
        if len(words) == 3 and words[1].upper() == "AS":
            stages.add(words[2])
    users = [substitute(a, args) for k, a in steps if k == "USER"]
    uid = users[-1].partition(":")[0] if users else "0"
    if not uid.isdigit() or int(uid) == 0:
        problems.append(f"USER {uid}: must be a numeric non-root uid (runAsNonRoot checks the image's uid)")
    for keyword, value in steps:
        if keyword in ("ARG", "ENV"):
            for name in re.findall(r"(\w+)=", value) or [value.split()[0]]:
                if SECRET_NAME.search(name):
                    problems.append(f"{keyword} {name}: pass secrets at run time, not in the image")
        if keyword in ("COPY", "ADD") and re.search(
            r"\.env\b|\.pem\b|token|credentials", value, re.IGNORECASE
        ):
            problems.append(f"{keyword} {value}: copies a secret")
    return problems


def test_dockerfile_is_pinned_non_root_and_secret_free() -> None:
    assert dockerfile_problems(DOCKERFILE.read_text()) == []
    steps, args = parsed(DOCKERFILE.read_text())
    assert [substitute(a, args) for k, a in steps if k == "FROM"][-1].startswith("nvidia/cuda:13.")
    ignored = (REPO / "deploy" / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "runs", ".env"} <= set(ignored)


def test_dockerfile_check_reports_each_problem() -> None:
    bad = """
        ARG BASE=nvidia/cuda
        FROM python:3.11 AS build
        FROM ${BASE}
        ARG HF_TOKEN
        ENV PATH=/x \\
            WANDB_API_KEY=abc
        COPY .env /app/.env
        USER root
    """
    assert dockerfile_problems(bad) == [
        "FROM nvidia/cuda: not pinned to a tag or digest",
        "USER root: must be a numeric non-root uid (runAsNonRoot checks the image's uid)",
        "ARG HF_TOKEN: pass secrets at run time, not in the image",
        "ENV WANDB_API_KEY: pass secrets at run time, not in the image",
        "COPY .env /app/.env: copies a secret",
    ]
    assert dockerfile_problems("FROM ubuntu:latest\nUSER 1000") == [
        "FROM ubuntu:latest: not pinned to a tag or digest"
    ]


def test_image_uid_is_the_uid_the_pods_run_as() -> None:
    steps, args = parsed(DOCKERFILE.read_text())
    uid = int([substitute(a, args) for k, a in steps if k == "USER"][-1].partition(":")[0])
    pod_uids = set()
    for path in K8S_FILES:
        for doc in documents(path):
            if doc["kind"] in ("RayCluster", "RayJob"):
                for _, _, template in pod_templates(doc):
                    pod_uids.add(template["spec"]["securityContext"]["runAsUser"])
    assert pod_uids == {uid}


def test_installs_the_gpu_extra_into_the_repo_path_the_rayjobs_use() -> None:
    steps, args = parsed(DOCKERFILE.read_text())
    workdirs = [substitute(a, args) for k, a in steps if k == "WORKDIR"]
    assert workdirs[-1] == IMAGE_REPO_DIR
    runs = " ".join(a for k, a in steps if k == "RUN")
    assert re.search(r"""pip install [^&]*["']?\.\[gpu\]""", runs), "the gpu extra is not installed"
    for keyword, copied in steps:
        if keyword == "COPY" and not copied.startswith("--from"):
            *sources, _ = copied.split()
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: no such path in the repo"
    # The RayJobs read their config from the image's copy of configs/.
    for path in K8S_FILES:
        for doc in documents(path):
            if doc["kind"] == "RayJob":
                assert f"{IMAGE_REPO_DIR}/configs/" in doc["spec"]["entrypoint"]
    assert ("COPY", "configs ./configs") in steps


def test_kuberay_probe_and_start_tools_are_installed() -> None:
    # KubeRay starts pods with `bash -lc 'ulimit ...; ray start ...'` and probes them with wget.
    steps, _ = parsed(DOCKERFILE.read_text())
    runs = " ".join(a for k, a in steps if k == "RUN")
    assert re.search(r"apt-get install[^&]*\bwget\b", runs) and re.search(
        r"apt-get install[^&]*\bbash\b", runs
    )


def test_cuda_base_is_rechecked_when_vllm_moves() -> None:
    # The CUDA 13 base was chosen for vllm 0.32.0 (built against CUDA 13); a new vllm pin may need another.
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["gpu"] == ["vllm==0.32.0"]
