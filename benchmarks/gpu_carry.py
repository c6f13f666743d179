"""The wheels a lent GPU machine lacks for the calibration, downloaded into `.gpu-wheels/`.

That machine (Python 3.12, x86-64; torch, transformers, accelerate, peft, safetensors, opencv,
huggingface-hub and the rest of `MACHINE_PACKAGES`) reaches no package registry, and at most 64
MiB travels with a run: the working tree and the carried folders together. The calibration
(`benchmarks/gpu_calibration.py`) needs only diffusers and pydantic from outside that list.

`make gpu-carry` (`python -m benchmarks.gpu_carry`) downloads exactly `carry_pins()` (no
dependencies resolved by pip: each wheel's own requirements are then checked offline against the
other carried wheels and the machine's packages), keeps only pure wheels or cp312 manylinux
x86-64 ones, one version of each package, and checks the total against the 64 MiB limit. On the
machine, `benchmarks/gpu_calibration.sh` installs them with `pip install --no-index --no-deps`.

Decisions (the why):
- Versions: diffusers and the pydantic family at the versions installed here (the versions the
  unit tests ran), typing-extensions too (pydantic needs a newer one than the machine may have).
- huggingface-hub is pinned to the machine's own 1.33.0 (its pip list, 2026-11): diffusers needs
  >= 1.32 and the machine's transformers 5.17 accepts it, while the 2.x installed here would pull
  in other HTTP packages the machine lacks.
- importlib-metadata, which diffusers names, is not carried: diffusers imports it only on Python
  < 3.8 (3.12's importlib.metadata serves).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from serve.wheels import download_wheels

ROOT = Path(__file__).resolve().parents[1]
WHEEL_DIR = ROOT / ".gpu-wheels"
CARRY_LIMIT_BYTES = 64 * 2**20  # the device tool's limit on everything that travels
# The machine: CPython 3.12 on x86-64 Linux (the device tool's KINDS.md, read 2026-11).
MACHINE_PYTHON = "3.12"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
FROM_THIS_ENVIRONMENT = (
    "diffusers",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
)
FIXED_PINS = {"huggingface-hub": "1.33.0"}
# What the machine's image holds (KINDS.md "Python packages already there", read 2026-11-17).
MACHINE_PACKAGES = frozenset(
    canonicalize_name(name)
    for name in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn
einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest python-dateutil pytorch-lightning pyyaml regex requests
rich safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
xarray xxhash yarl zipp
""".split()
)
# Needs of carried wheels that the machine serves otherwise (see the module's decisions).
NOT_NEEDED = frozenset({"importlib-metadata"})


def carry_pins() -> dict[str, str]:
    """Package -> version to carry."""
    pins = {name: importlib.metadata.version(name) for name in FROM_THIS_ENVIRONMENT}
    return pins | FIXED_PINS


@dataclass(frozen=True)
class Wheel:
    """One wheel file: its package, version and size."""

    file: str
    name: str
    version: Version
    bytes: int


def runs_on_machine(file: str) -> bool:
    """Pure Python, or built for CPython 3.12 (or an abi3 wheel of an older CPython 3) on
    manylinux x86-64."""
    _, _, _, tags = parse_wheel_filename(file)
    for tag in tags:
        if tag.platform == "any" and tag.abi == "none" and tag.interpreter in ("py3", "py312"):
            return True
        if not (tag.platform.startswith("manylinux") and tag.platform.endswith("_x86_64")):
            continue
        if tag.interpreter == "cp312" and tag.abi == "cp312":
            return True
        minor = tag.interpreter.removeprefix("cp3")
        if tag.abi == "abi3" and tag.interpreter.startswith("cp3") and minor.isdigit():
            if int(minor) <= 12:
                return True
    return False


def select_wheels(files: dict[str, int], pins: dict[str, str]) -> tuple[list[Wheel], list[str]]:
    """(the wheels to carry, the problems) from `files` (file name -> bytes) for `pins`.

    A wheel of a pinned package at another version, or of an unpinned package, is left out
    (stale downloads); one that cannot run on the machine, a second wheel of one version, or
    a pin without its wheel is a problem.
    """
    wanted = {canonicalize_name(name): Version(version) for name, version in pins.items()}
    chosen: dict[str, Wheel] = {}
    problems = []
    for file, size in sorted(files.items()):
        if not file.endswith(".whl"):
            continue
        name, version, _, _ = parse_wheel_filename(file)
        if wanted.get(name) != version:
            continue
        if not runs_on_machine(file):
            problems.append(f"{file} does not run on CPython {MACHINE_PYTHON} x86-64 Linux")
            continue
        if name in chosen:
            problems.append(f"two wheels of {name} {version}: {chosen[name].file} and {file}")
            continue
        chosen[name] = Wheel(file, name, version, size)
    problems += [
        f"no wheel of {name}=={version}" for name, version in wanted.items() if name not in chosen
    ]
    return [chosen[name] for name in sorted(chosen)], problems


def unmet_requirements(
    requirements: dict[str, list[str]], carried: dict[str, Version]
) -> list[str]:
    """Requirements (Requires-Dist lines per carried package) that neither a carried wheel nor
    the machine meets, evaluated for CPython 3.12 on x86-64 Linux (extras left out)."""
    environment = default_environment() | {
        "python_version": MACHINE_PYTHON,
        "python_full_version": f"{MACHINE_PYTHON}.3",
        "platform_machine": "x86_64",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "implementation_name": "cpython",
        "extra": "",
    }
    unmet = []
    for package, lines in sorted(requirements.items()):
        for line in lines:
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate(environment):
                continue
            name = canonicalize_name(requirement.name)
            if name in carried:
                if not requirement.specifier.contains(carried[name], prereleases=True):
                    unmet.append(f"{package} needs {line}; carried {name} {carried[name]}")
            elif name not in MACHINE_PACKAGES and name not in NOT_NEEDED:
                unmet.append(f"{package} needs {line}; neither carried nor on the machine")
    return unmet


def wheel_requirements(path: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(path) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(metadata).decode("utf-8")
    prefix = "Requires-Dist:"
    return [line[len(prefix) :].strip() for line in text.splitlines() if line.startswith(prefix)]


def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of what travels besides the carried folders: tracked files and untracked files
    git does not ignore."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    return sum((root / name).stat().st_size for name in listed if name and (root / name).is_file())


def size_problems(wheels: list[Wheel], tree: int, limit: int = CARRY_LIMIT_BYTES) -> list[str]:
    """The limit's problem, if the wheels and the working tree together exceed it."""
    total = tree + sum(w.bytes for w in wheels)
    if total <= limit:
        return []
    return [
        f"wheels {sum(w.bytes for w in wheels) / 2**20:.1f} MiB + working tree "
        f"{tree / 2**20:.1f} MiB = {total / 2**20:.1f} MiB > {limit / 2**20:.0f} MiB"
    ]


def download(pins: dict[str, str], destination: Path) -> None:
    """`pip download` the pinned wheels for the machine (no dependencies, binaries only)."""
    platforms = [option for platform in PLATFORMS for option in ("--platform", platform)]
    machine = ["--python-version", MACHINE_PYTHON, "--implementation", "cp", *platforms]
    requirements = [f"{name}=={version}" for name, version in sorted(pins.items())]
    download_wheels(requirements, destination, machine)


def check(directory: Path, pins: dict[str, str], tree: int) -> tuple[list[Wheel], list[str]]:
    """Select the carried wheels in `directory` and list every problem with them."""
    files = {p.name: p.stat().st_size for p in directory.glob("*.whl")}
    wheels, problems = select_wheels(files, pins)
    requirements = {w.name: wheel_requirements(directory / w.file) for w in wheels}
    problems += unmet_requirements(requirements, {w.name: w.version for w in wheels})
    problems += size_problems(wheels, tree)
    return wheels, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=WHEEL_DIR, help="where the wheels go")
    parser.add_argument("--check-only", action="store_true", help="no download; check the dir")
    args = parser.parse_args(argv)
    pins = carry_pins()
    args.dir.mkdir(parents=True, exist_ok=True)
    if not args.check_only:
        download(pins, args.dir)
    wheels, problems = check(args.dir, pins, tree_bytes())
    kept = {w.file for w in wheels}
    for stale in args.dir.glob("*.whl"):  # two versions of one package stop the install there
        if stale.name not in kept:
            stale.unlink()
            print(f"removed {stale.name} (not pinned)")
    for wheel in wheels:
        print(f"{wheel.bytes / 2**20:7.2f} MiB  {wheel.file}")
    total = sum(w.bytes for w in wheels)
    print(
        f"{len(wheels)} wheels, {total / 2**20:.1f} MiB; working tree "
        f"{tree_bytes() / 2**20:.1f} MiB; limit {CARRY_LIMIT_BYTES / 2**20:.0f} MiB"
    )
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
