"""The ``maskrcnn`` command line."""

from __future__ import annotations

import argparse
import sys

from maskrcnn import __version__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="maskrcnn",
        description="Mask R-CNN family (Mask R-CNN, Cascade Mask R-CNN, Keypoint R-CNN) in pure PyTorch.",
    )
    p.add_argument("--version", action="version", version=f"maskrcnn {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    smoke = sub.add_parser(
        "smoke",
        help="run the detection ops (NMS, RoIAlign, RoIPool) on a generated image",
        description="Generate an image with shapes and detector-like candidate boxes, keep the best with "
        "NMS, pool them with RoIAlign and RoIPool, print timings and write a PNG of the result.",
    )
    smoke.add_argument("--out", default="outputs/smoke", help="output folder (default: outputs/smoke)")
    smoke.add_argument("--seed", type=int, default=0, help="random seed of the generated scene (default: 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "smoke":
        from maskrcnn.smoke import run_smoke

        run_smoke(args.out, args.seed)
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
