"""python -m engine.compress --model IN --out OUT [--skip-modules down_proj layers.0]"""

from __future__ import annotations

import argparse

from engine.compress.prune24 import prune_checkpoint
from engine.loader.checkpoint import ModelLoadError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m engine.compress",
        description="Magnitude 2:4 pruning of a checkpoint's linear layers into a new checkpoint folder.",
    )
    parser.add_argument("--model", required=True, help="the checkpoint folder to prune")
    parser.add_argument("--out", required=True, help="a new folder for the pruned checkpoint")
    parser.add_argument(
        "--skip-modules",
        nargs="*",
        default=[],
        help="module names (or name parts such as down_proj, layers.0) to leave dense",
    )
    args = parser.parse_args(argv)
    try:
        marker = prune_checkpoint(args.model, args.out, tuple(args.skip_modules))
    except (ValueError, OSError, ModelLoadError) as e:
        parser.exit(2, f"error: {e}\n")
    print(f"pruned {marker['num_pruned_tensors']} weight tensors 2:4 into {args.out}")


if __name__ == "__main__":
    main()
