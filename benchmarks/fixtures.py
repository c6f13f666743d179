"""Fixtures the benchmark scripts share: the bench clips, warm models, the app as a
subprocess, an SD 1.5-size random model, machine facts. No benchmark script imports another
one; what two of them need lives here (or in benchmarks/common.py: results and the machine).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import yaml

from benchmarks.common import machine_summary
from serve.config import AppArgs
from serve.local_app import free_port, load_config

REPO = Path(__file__).parents[1]
# The overhead and load benchmarks' clip: the sample video looped to 10 s, 640 px, 25 fps.
CLIP_SECONDS, CLIP_FPS, CLIP_WIDTH = 10.0, 25.0, 640
WARMUP_SECONDS = 2.0
START_TIMEOUT_S = 300.0  # `motionserve serve` launch -> /readyz 200
STOP_TIMEOUT_S = 30.0


# ---------------------------------------------------------------------------------- clips


def make_1080p_clip(cache_dir: Path, seconds: float = 10.0) -> Path:
    """The sample video cropped to 1920x1080 at 30 fps, looped to `seconds` (cached)."""
    from deployments.video import DecodeSettings, EncodeSettings, decode_all, encode_mp4
    from serve.samples import sample_video_path

    target = cache_dir / "bench" / f"sports2d-1080p30-{seconds:g}s.mp4"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    source = sample_video_path(cache_dir)
    frames = decode_all(source, DecodeSettings(fps=30, width=1920, height=1080, fit="crop"))
    needed = int(seconds * 30)
    looped = np.concatenate([frames, frames[::-1]] * (needed // (2 * len(frames)) + 1))[:needed]
    encode_mp4(iter(looped), target, EncodeSettings(fps=30, crf=20, preset="medium"))
    return target


def bench_clips(cache_dir: Path) -> tuple[Path, Path]:
    """The 10 s clip and its first 2 s (for the warm-up), built once and cached."""
    from deployments.video import DecodeSettings, EncodeSettings, decode_all, encode_mp4
    from serve.samples import sample_video_path

    folder = cache_dir / "bench"
    clip = folder / f"overhead-sports2d-{CLIP_WIDTH}w-{CLIP_FPS:g}fps-{CLIP_SECONDS:g}s.mp4"
    warmup = clip.with_name(clip.stem + f"-first{WARMUP_SECONDS:g}s.mp4")
    if clip.exists() and warmup.exists():
        return clip, warmup
    folder.mkdir(parents=True, exist_ok=True)
    settings = DecodeSettings(fps=CLIP_FPS, width=CLIP_WIDTH)
    source = decode_all(sample_video_path(cache_dir), settings)
    frames = ping_pong(source, round(CLIP_SECONDS * CLIP_FPS))
    encode_mp4(frames, clip, EncodeSettings(fps=CLIP_FPS))
    encode_mp4(frames[: round(WARMUP_SECONDS * CLIP_FPS)], warmup, EncodeSettings(fps=CLIP_FPS))
    return clip, warmup


def ping_pong(frames: np.ndarray, count: int) -> np.ndarray:
    """Forward, backward, forward... without repeating the turning frames: smooth motion."""
    cycle = np.concatenate([frames, frames[-2:0:-1]])
    repeats = -(-count // len(cycle))
    return np.concatenate([cycle] * repeats)[:count]


# ------------------------------------------------------------------------------ models


@contextlib.contextmanager
def warm_models(args: AppArgs) -> Iterator[None]:
    """Load the diffusion engine and upscaler once and let every `edit_video` reuse them, as a
    warm replica does (`edit_video` builds its own through serve.factory otherwise)."""
    from serve import factory

    engine, upscaler = factory.make_engine(args), factory.make_upscaler(args)
    engine.load()
    upscaler.load()
    saved = factory.make_engine, factory.make_upscaler
    factory.make_engine = lambda _args: engine
    factory.make_upscaler = lambda _args: upscaler
    try:
        yield
    finally:
        factory.make_engine, factory.make_upscaler = saved


def build_sd15_random(directory: Path, tiny_dir: Path, dtype) -> Path:
    """An SD 1.5-shaped diffusers directory with random weights (tokenizer and scheduler config
    from the tiny models; token ids fit the full vocabulary). Never committed."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    shutil.copytree(tiny_dir, directory)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
    models = {
        "unet": unet,
        "controlnet": ControlNetModel.from_unet(unet, load_weights_from_unet=False),
        "vae": AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            sample_size=512,
        ),
        "text_encoder": CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                projection_dim=768,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        ),
    }
    for name, model in models.items():
        shutil.rmtree(directory / name)
        model.to(dtype).save_pretrained(directory / name)
    return directory


def quiet_progress_bars() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


# ------------------------------------------------------------------------------ machine


def machine_info(threads: int) -> dict[str, Any]:
    import diffusers
    import torch

    return {
        **machine_summary(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "torch_threads": threads,
        "shared": "other jobs may run on the machine (see the load average): timings are the "
        "best of repeats",
    }


# ---------------------------------------------------------------------------- the app


class ServeApp:
    """`motionserve serve` in a session of its own, with a fresh storage directory."""

    def __init__(self, folder: Path, upscaler: str, chunks: int):
        self.folder = folder
        self.storage = folder / "store"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "server.log"
        self.config = folder / "serve.yaml"
        config = load_config(port=self.port)
        config["applications"][0]["args"].update(
            storage_uri=str(self.storage), upscaler_model=upscaler, max_chunks_in_flight=chunks
        )
        self.config.write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen | None = None

    def start(self) -> float:
        """Launch and wait for /readyz 200; returns the seconds it took (the cold start)."""
        # RAY_TMPDIR: Ray's session files (logs, sockets) in our folder, removed afterwards.
        env = {**os.environ, "RAY_TMPDIR": str(self.folder / "ray"),
               "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}  # fmt: skip
        command = [sys.executable, "-m", "serve.cli", "serve", "--config", str(self.config),
                   "--metrics-port", str(free_port())]  # fmt: skip
        started = time.perf_counter()
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )  # fmt: skip
        self._wait_ready()
        return time.perf_counter() - started

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited ({self.process.returncode}); see {self.log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)  # waiting for another process to come up: poll its readiness
        raise TimeoutError(f"server not ready after {START_TIMEOUT_S:.0f} s; see {self.log}")

    def processes(self) -> list[psutil.Process]:
        """Every process of the app: the server's descendants and its session (Ray's daemons
        and workers)."""
        if self.process is None:
            return []
        found: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.process.pid)
            for proc in [root, *root.children(recursive=True)]:
                found[proc.pid] = proc
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(proc.pid) == self.process.pid:
                    found[proc.pid] = proc
        return list(found.values())

    def cpu_seconds(self) -> dict[int, float]:
        times = {}
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                cpu = proc.cpu_times()
                times[proc.pid] = cpu.user + cpu.system
        return times

    def clear_cache(self) -> None:
        """Forget every artifact (decode, pose, generations, segments): the next job redoes all.
        Job manifests and uploads stay."""
        shutil.rmtree(self.storage / "cache", ignore_errors=True)

    def stop(self) -> None:
        """SIGTERM (the CLI shuts the app and its own Ray down), then kill what is left of the
        app's processes, by pid."""
        if self.process is None:
            return
        leftovers = self.processes()
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=STOP_TIMEOUT_S)
        for proc in leftovers:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(leftovers, timeout=STOP_TIMEOUT_S)
        if self.process.poll() is None:
            self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""
