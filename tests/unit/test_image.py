"""The container image's recipe agrees with what it packages and what deploys it.

The Dockerfile cannot be built here (no Docker daemon, no container registry), so these tests
read it: its base image's Ray and Python must be pyproject.toml's pins and the chart's
rayVersion, it must end as a non-root user, copy in no weights, and put the upscalers it
converts where the app looks for them and the chart does not hide them. `make image` must say
clearly when it cannot build.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from serve.config import Settings
from serve.weights import upscaler_dir

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
CHART = REPO / "k8s" / "motionserve"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".onnx", ".param")


@dataclass
class Instruction:
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    """Default values of the ARGs declared before the first FROM (the ones FROM can use)."""
    defaults = {}
    for instruction in instructions:
        if instruction.keyword == "FROM":
            break
        if instruction.keyword == "ARG" and "=" in instruction.args:
            name, _, value = instruction.args.partition("=")
            defaults[name] = value.strip('"')
    return defaults


def substitute(text: str, variables: dict[str, str]) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in variables, f"${name} has no default in the Dockerfile"
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def ray_pin(pyproject: dict) -> str:
    for line in pyproject["project"]["dependencies"]:
        requirement = Requirement(line)
        if requirement.name == "ray":
            (spec,) = requirement.specifier
            assert spec.operator == "==", "Ray must be pinned exactly"
            return spec.version
    raise AssertionError("pyproject.toml does not depend on ray")


def python_minor(pyproject: dict) -> str:
    """The one Python minor version requires-python admits (the project pins one)."""
    allowed = SpecifierSet(pyproject["project"]["requires-python"])
    minors = [f"3.{minor}" for minor in range(8, 20) if f"3.{minor}.0" in allowed]
    assert len(minors) == 1, f"requires-python admits {minors}; the image needs exactly one"
    return minors[0]


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    starts = [i for i, instruction in enumerate(instructions) if instruction.keyword == "FROM"]
    return instructions[starts[-1] :]


def env(instructions: list[Instruction]) -> dict[str, str]:
    values = {}
    for instruction in final_stage(instructions):
        if instruction.keyword == "ENV":
            for item in shlex.split(instruction.args):
                name, _, value = item.partition("=")
                values[name] = value
    return values


# ------------------------------------------------------------------------- versions


def test_the_dockerfile_parser_joins_continuations_and_drops_comments():
    text = "# top\nARG A=1\nRUN one \\\n    # inside\n    two\n\nUSER 7\n"
    assert parse_dockerfile(text) == [
        Instruction("ARG", "A=1"),
        Instruction("RUN", "one      two"),
        Instruction("USER", "7"),
    ]


def test_base_is_rays_cuda_image_for_the_pinned_ray_and_python(dockerfile, pyproject):
    args = arg_defaults(dockerfile)
    (base,) = [i.args for i in dockerfile if i.keyword == "FROM"]
    image = substitute(base, args)
    pattern = r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)-cu(?P<cuda>\d{3})"
    match = re.fullmatch(pattern, image)
    assert match, f"{image} is not one of Ray's CUDA images (<ray>-py<XY>-cu<XYZ>)"
    python = python_minor(pyproject)
    assert match["ray"] == args["RAY_VERSION"] == ray_pin(pyproject)
    assert match["py"] == python.replace(".", "")
    assert args["PYTHON_VERSION"] == python
    assert args["PYTHON_TAG"] == "py" + python.replace(".", "")


def test_build_checks_the_installed_ray_and_python(dockerfile):
    """The build itself fails if the base holds another Ray or Python than the ARGs say."""
    stage = final_stage(dockerfile)
    redeclared = {i.args.partition("=")[0] for i in stage if i.keyword == "ARG"}
    assert {"RAY_VERSION", "PYTHON_VERSION"} <= redeclared, "ARGs must be redeclared after FROM"
    checks = " ".join(i.args for i in stage if i.keyword == "RUN")
    assert "ray.__version__ == '${RAY_VERSION}'" in checks
    assert "== '${PYTHON_VERSION}'" in checks


def test_chart_ray_version_is_the_images(dockerfile, pyproject):
    ray = arg_defaults(dockerfile)["RAY_VERSION"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["rayVersion"] == ray == ray_pin(pyproject)
    for tier in sorted(CHART.glob("values-*.yaml")):
        overrides = yaml.safe_load(tier.read_text()) or {}
        assert overrides.get("rayVersion", ray) == ray, f"{tier.name} sets another rayVersion"
    template = (CHART / "templates" / "rayservice.yaml").read_text()
    assert "rayVersion: {{ .Values.rayVersion | quote }}" in template


# ------------------------------------------------------------------- the chart's image


def makefile_default(name: str) -> str:
    match = re.search(rf"^{name} \?= (.+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile has no default for {name}"
    return match.group(1).strip()


def test_chart_default_image_is_what_make_image_tags(pyproject):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert values["image"]["repository"] == makefile_default("IMAGE_REPOSITORY") == "motionserve"
    assert values["image"]["tag"] == "", "an empty tag takes the chart's appVersion"
    assert chart["appVersion"] == pyproject["project"]["version"]
    for tier in sorted(CHART.glob("values-*.yaml")):
        overrides = yaml.safe_load(tier.read_text()) or {}
        assert "image" not in overrides, f"{tier.name} must not change the image"
    # `make image` tags pyproject's version: ask make itself what the tag is.
    expanded = subprocess.run(
        ["make", "-s", "--eval", "print-tag: ; @echo $(IMAGE_TAG)", "print-tag"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "MAKEFLAGS": ""},
        timeout=60,
        check=True,
    )
    assert expanded.stdout.strip() == pyproject["project"]["version"]


def test_values_document_how_to_point_at_a_registry():
    text = (CHART / "values.yaml").read_text()
    block = text[text.index("image:") : text.index("  repository:")]
    assert "make image" in block and "<registry>/motionserve" in block


# --------------------------------------------------------------- user and contents


def test_the_image_runs_as_a_numeric_non_root_user(dockerfile):
    users = [i.args for i in final_stage(dockerfile) if i.keyword == "USER"]
    assert users, "the Dockerfile must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), "a numeric uid lets Kubernetes' runAsNonRoot verify it"
    assert int(uid) != 0


def copied_sources(instructions: list[Instruction]) -> list[str]:
    sources = []
    for instruction in instructions:
        if instruction.keyword in {"COPY", "ADD"}:
            words = [w for w in shlex.split(instruction.args) if not w.startswith("--")]
            sources += words[:-1]
    return sources


def test_no_weights_are_copied_into_the_image(dockerfile):
    assert not [i for i in dockerfile if i.keyword == "ADD"], "ADD may fetch URLs; use COPY"
    sources = copied_sources(dockerfile)
    assert set(sources) == {"pyproject.toml", "README.md", "serve", "deployments"}
    for source in sources:
        path = REPO / source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        weights = [str(p.relative_to(REPO)) for p in files if p.suffix in WEIGHT_SUFFIXES]
        assert weights == [], f"weights would be copied into the image: {weights}"


def test_dockerignore_allows_only_what_is_copied_and_never_weights(dockerfile):
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "the build context is an allow-list"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == set(copied_sources(dockerfile))
    for suffix in (".safetensors", ".pth", ".bin", ".ckpt"):
        assert f"**/*{suffix}" in lines


def test_package_data_ships_every_non_python_file():
    """The image installs motionserve non-editable: files beside the code must be package data."""
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = package_data.get("package-data", {})
    missing = []
    for package in ("serve", "deployments"):
        for path in (REPO / package).rglob("*"):
            if not path.is_file() or path.suffix in {".py", ".pyc"}:
                continue
            relative = path.relative_to(REPO / package)
            if not any(relative.match(pattern) for pattern in globs.get(package, [])):
                missing.append(str(path.relative_to(REPO)))
    assert missing == []


# -------------------------------------------------------- upscalers converted at build time


def test_upscalers_are_converted_at_build_time_where_the_app_reads_them(dockerfile):
    stage = final_stage(dockerfile)
    fetch = [i.args for i in stage if i.keyword == "RUN" and "serve.weights fetch" in i.args]
    assert len(fetch) == 1, "the Real-ESRGAN conversion runs once, at build time"
    cache_dir = re.search(r"--cache-dir (\S+)", fetch[0]).group(1)
    configured = env(dockerfile)["MOTIONSERVE_UPSCALER_DIR"]
    assert configured == str(upscaler_dir(cache_dir))
    assert "upscaler_dir" in Settings.model_fields  # the variable the app really reads
    # The chart mounts emptyDirs over these paths: the converted models must not be under one.
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    mounts = re.findall(r"mountPath: (\S+)", helpers)
    assert "/var/cache/motionserve" in mounts
    for mount in mounts:
        assert not Path(configured).is_relative_to(mount), f"{mount} would hide the upscalers"


# ------------------------------------------------------------------------- make image


def run_make_image(path: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PATH": path, "MAKEFLAGS": "", **extra_env}
    return subprocess.run(
        [shutil.which("make"), "-s", "image"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
        check=False,
    )


def test_make_image_without_docker_says_so_and_fails(tmp_path):
    bin_dir = tmp_path / "bin"  # sed only: no docker on this PATH
    bin_dir.mkdir()
    (bin_dir / "sed").symlink_to(shutil.which("sed"))
    result = run_make_image(str(bin_dir))
    assert result.returncode != 0
    assert "make image: docker is not installed" in result.stderr
    assert "docker build" not in result.stdout


@pytest.mark.skipif(shutil.which("docker") is None, reason="needs the docker client")
def test_make_image_without_a_daemon_says_so_and_fails(tmp_path):
    result = run_make_image(os.environ["PATH"], DOCKER_HOST=f"unix://{tmp_path / 'no-daemon.sock'}")
    assert result.returncode != 0
    assert "make image: the docker daemon is not reachable" in result.stderr
