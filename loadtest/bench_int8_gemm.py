"""Which int8 GEMM PyTorch offers on this CPU is fastest, against the float linears the engine runs.

For decode- and prefill-shaped matmuls (M rows, K inputs, N outputs) it times, each weight prepared once as
the engine prepares it at load (milliseconds per matmul, the best of 3 repeats):
  fp32-packed     float32 weight in oneDNN's layout (engine.layers.packed_linear)
  bf16            the engine's bfloat16 linear (packed where oneDNN has bfloat16, else
                  Bfloat16OnFloat32Method's path)
  fbgemm          engine.quant.w8a8 through fbgemm (per-token activations, scales, as served)
  onednn          engine.quant.w8a8 through onednn::qlinear_pointwise (as Inductor's x86
                  quantizer lowers a quantised linear)
  int-mm          torch._int_mm(x_q, W_q^T) -> int32 only (no prepacking, no scales)
  fbgemm-dynamic  torch.ops.quantized.linear_dynamic (per-tensor activations, reduce_range)
and checks whether each w8a8 kernel's output equals a float64 reference of the same integer
arithmetic with 8-bit (A = 127) and 7-bit (A = 63) activation codes.

    .venv/bin/python loadtest/bench_int8_gemm.py [--threads 2] [--shapes 2048x2048 8192x8192] [--rows 1 4 16 64 128 512]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.kernels import cpu_features
from engine.layers.packed_linear import _bf16_linear, can_pack
from engine.quant import w8a8

warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")


CLOCK = time.perf_counter  # --clock process: this process's CPU time (robust on a shared machine)


def _time(fn, repeats: int = 3, min_seconds: float = 0.05) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        runs, start = 0, CLOCK()
        while (elapsed := CLOCK() - start) < min_seconds or runs < 2:
            fn()
            runs += 1
        best = min(best, elapsed / runs)
    return best


def candidates(weight: torch.Tensor) -> dict:
    """name -> a callable x [M, K] float32 -> output, for one weight [N, K]."""
    out = {}
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 64)
    out["fp32-packed"] = lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    w16 = weight.to(torch.bfloat16)
    if can_pack(torch.device("cpu"), torch.bfloat16):
        p16 = torch.ops.mkldnn._reorder_linear_weight(w16, 64)
        out["bf16"] = lambda x: torch.ops.mkldnn._linear_pointwise(
            x.to(torch.bfloat16), p16, None, "none", [], ""
        )
    else:
        out["bf16"] = lambda x: _bf16_linear(x.to(torch.bfloat16), w16)
    w_q, w_scale = w8a8.quantize_weight(weight)
    for kernel in ("fbgemm", "onednn"):
        state = w8a8.prepare(kernel, w_q, w_scale)
        out[kernel] = lambda x, k=kernel, s=state: w8a8.linear(k, s, x, None)
    w_qt = w_q.t()
    out["int-mm"] = lambda x: torch._int_mm(x.to(torch.int8), w_qt)
    zero_points = torch.zeros(w_q.shape[0], dtype=torch.long)
    fb = torch.ops.quantized.linear_prepack(
        torch._make_per_channel_quantized_tensor(w_q, w_scale.double(), zero_points, 0), None
    )
    out["fbgemm-dynamic"] = lambda x: torch.ops.quantized.linear_dynamic(x, fb, True)
    return out


def exactness(weight: torch.Tensor) -> list[str]:
    w_q, w_scale = w8a8.quantize_weight(weight)
    x = torch.randn(64, weight.shape[1]) * 3
    lines = []
    for kernel in ("fbgemm", "onednn"):
        state = w8a8.prepare(kernel, w_q, w_scale)
        for act_max in (127, 63):
            y = w8a8.linear(kernel, state, x, None, act_max).double()
            x_q, x_scale = w8a8.quantize_per_token(x, act_max)
            ref = (x_q.double() @ w_q.double().t()) * x_scale.double() * w_scale.double()
            err = ((y - ref).abs().max() / ref.abs().max()).item()
            verdict = "exact up to float rounding" if err < 1e-6 else "NOT exact (saturates)"
            lines.append(f"{kernel}, A = {act_max}: max error {err:.1e} of the largest output: {verdict}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--shapes", nargs="*", default=["2048x2048", "8192x8192"], help="KxN")
    parser.add_argument("--rows", type=int, nargs="*", default=[1, 4, 16, 64, 128, 512])
    parser.add_argument("--only", nargs="*", help="these candidates only (default: all)")
    parser.add_argument(
        "--clock",
        choices=["wall", "process"],
        default="wall",
        help="process: CPU time of this process (with --threads 1, what a call costs on a busy machine)",
    )
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {cpu_features.describe()}, vnni={torch.cpu._is_vnni_supported()}")
    print(f"{args.threads} threads; the engine would choose: {w8a8.choose_kernel()}")
    for shape in args.shapes:
        size, out_features = (int(n) for n in shape.split("x"))
        weight = torch.randn(out_features, size) / size**0.5
        for line in exactness(weight):
            print(line)
        kernels = candidates(weight)
        names = [name for name in kernels if not args.only or name in args.only]
        print(f"\nK = {size}, N = {out_features}: milliseconds per matmul (best of 3, {args.clock} clock)")
        print("| M | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        for rows in args.rows:
            x = torch.randn(rows, size)
            cells = []
            for name in names:
                if name == "int-mm" and (rows <= 16 or size * out_features * rows > 2048 * 2048 * 128):
                    cells.append("-")  # needs > 16 rows; naive loops: seconds at prefill sizes
                    continue
                ms = _time(lambda f=kernels[name], x=x: f(x)) * 1e3
                cells.append(f"{ms:.3f}")
            print(f"| {rows} | " + " | ".join(cells) + " |", flush=True)
        del kernels


if __name__ == "__main__":
    main()
