"""python -m engine.compress --model IN --out OUT [--skip-modules down_proj layers.0]   (2:4 pruning)
python -m engine.compress w8a8 IN OUT [--skip-modules down_proj layers.0]          (W8A8 int8)"""

from __future__ import annotations

import argparse
import sys

from engine.compress.prune24 import prune_checkpoint
from engine.compress.w8a8 import compress_w8a8
from engine.loader.checkpoint import ModelLoadError

SKIP_HELP = "module names (or name parts such as down_proj, layers.0) to leave float"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["w8a8"]:
        return _w8a8(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m engine.compress",
        description="Magnitude 2:4 pruning of a checkpoint's linear layers into a new checkpoint folder "
        "(`python -m engine.compress w8a8 -h`: W8A8 int8 instead).",
    )
    parser.add_argument("--model", required=True, help="the checkpoint folder to prune")
    parser.add_argument("--out", required=True, help="a new folder for the pruned checkpoint")
    parser.add_argument("--skip-modules", nargs="*", default=[], help=SKIP_HELP.replace("float", "dense"))
    args = parser.parse_args(argv)
    try:
        marker = prune_checkpoint(args.model, args.out, tuple(args.skip_modules))
    except (ValueError, OSError, ModelLoadError) as e:
        parser.exit(2, f"error: {e}\n")
    print(f"pruned {marker['num_pruned_tensors']} weight tensors 2:4 into {args.out}")


def _w8a8(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m engine.compress w8a8",
        description="Write a float checkpoint as a compressed-tensors W8A8 int8 checkpoint "
        "(int8 weights per output channel, dynamic per-token int8 activations), for Sluice and vLLM.",
    )
    parser.add_argument("src", help="the float checkpoint folder")
    parser.add_argument("dst", help="a new folder for the W8A8 checkpoint")
    parser.add_argument("--skip-modules", nargs="*", default=[], help=SKIP_HELP)
    args = parser.parse_args(argv)
    try:
        config = compress_w8a8(args.src, args.dst, tuple(args.skip_modules))
    except (ValueError, OSError, ModelLoadError) as e:
        parser.exit(2, f"error: {e}\n")
    print(f"wrote W8A8 int8 weights into {args.dst} (float: {', '.join(config['ignore'])})")


if __name__ == "__main__":
    main()
