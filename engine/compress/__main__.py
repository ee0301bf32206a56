"""python -m engine.compress --model IN --out OUT [--skip-modules down_proj layers.0]   (2:4 pruning)
python -m engine.compress w8a8 IN OUT [--skip-modules down_proj layers.0]          (W8A8 int8)
python -m engine.compress w8a8 IN OUT --smooth CALIBRATION.txt [--alpha 0.5]       (SmoothQuant first)"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.compress.prune24 import prune_checkpoint
from engine.compress.smooth import DEFAULT_ALPHA, compute_smoothing
from engine.compress.w8a8 import compress_w8a8
from engine.loader.checkpoint import ModelLoadError, check_checkpoint_folder

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
    parser.add_argument(
        "--smooth",
        metavar="TEXT_FILE",
        help="SmoothQuant: calibrate on this UTF-8 text (cut into windows of --seq-len tokens) and "
        "move activation outliers into the weights before quantising (engine/compress/smooth.py)",
    )
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="smoothing strength in [0, 1]")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows (at most)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    args = parser.parse_args(argv)
    try:
        smoothing = None
        if args.smooth:
            if args.samples < 1 or args.seq_len < 1:
                raise ValueError("--samples and --seq-len must be at least 1")
            if Path(args.dst).exists():  # before calibrating: the writer would refuse it after
                raise FileExistsError(f"{args.dst} exists; choose a new output folder")
            check_checkpoint_folder(args.src)
            text = Path(args.smooth).read_text(encoding="utf-8")
            smoothing = compute_smoothing(args.src, text, args.alpha, args.samples, args.seq_len)
        config = compress_w8a8(args.src, args.dst, tuple(args.skip_modules), smoothing)
    except (ValueError, OSError, ModelLoadError) as e:
        parser.exit(2, f"error: {e}\n")
    how = f", smoothed (alpha {args.alpha})" if smoothing else ""
    print(f"wrote W8A8 int8 weights into {args.dst}{how} (float: {', '.join(config['ignore'])})")


if __name__ == "__main__":
    main()
