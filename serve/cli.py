"""The `motionserve` command.

User errors (bad input, bad settings) print one line on stderr and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from deployments.errors import InputError
from serve.config import Settings

EXIT_USER_ERROR = 2


def _cmd_probe(args: argparse.Namespace) -> None:
    from deployments.video import probe

    info = probe(args.video, Settings().input_limits())
    print(json.dumps(info.model_dump(), indent=2))


def _cmd_sample_video(args: argparse.Namespace) -> None:
    from serve.samples import sample_video_path

    print(sample_video_path(Settings().cache_dir))


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], None] = args.handler
    try:
        handler(args)
    except InputError as exc:
        print(f"motionserve {args.command}: error: {exc.message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"motionserve {args.command}: error: {exc.strerror}: {exc.filename}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
