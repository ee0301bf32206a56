"""What each compression mode costs in quality and gains in memory and speed.

For each mode (float32 reference, bitsandbytes int8 / nf4 / fp4, fp8 weights on CUDA with
compute capability >= 8.9, W8A8 int8 on CPU, fp8 KV cache, 2:4 magnitude pruning) on two checkpoints:

- `small`: the ~125M-parameter benchmark checkpoint with random weights (engine.demo.checkpoints);
- `trained`: a ~4M-parameter Llama trained here, deterministically on CPU (one thread, fixed
  seed, fixed steps; a few minutes), on the first 80% of loadtest/data/coriolanus.txt with
  its own BPE tokenizer. Random weights exaggerate quantisation error (their next-token
  distributions are nearly flat, so the argmax flips easily); a trained model shows what a
  mode does to a model that has learnt something.

it prints: weight bytes in memory (linear layers as stored, scales included), KV-cache tokens
that fit in a fixed budget, output tokens/s on the standard workload of bench_engine.py, and,
against the float32 model on the held-out text (teacher-forced, 2,000 positions through the
paged KV path): perplexity ratio, greedy next-token agreement and mean KL divergence.

    .venv/bin/python loadtest/bench_quant.py                   # everything, CPU (~30 min on 2 cores)
    .venv/bin/python loadtest/bench_quant.py --no-throughput   # quality, bytes and KV tokens only
    .venv/bin/python loadtest/bench_quant.py --quick           # tiny checkpoint, short run: checks the script
    .venv/bin/python loadtest/bench_quant.py --no-throughput --fp8-quality-on-cpu   # fp8's quality on CPU too
    .venv/bin/python loadtest/bench_quant.py --device cuda --dtype bfloat16 --preset gpu-1b
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from engine import EngineConfig, LLMEngine, ensure_demo_checkpoint  # noqa: E402
from engine.compress import compress_w8a8, prune_checkpoint  # noqa: E402
from engine.compress.smooth import compute_smoothing  # noqa: E402
from engine.evaluation.quality import compare, targets_for, teacher_forced_logits  # noqa: E402
from engine.quant import QuantizationError, model_weight_bytes  # noqa: E402
from loadtest.bench_engine import run_sluice  # noqa: E402
from loadtest.workloads import standard_workload  # noqa: E402

TEXT = REPO_ROOT / "loadtest" / "data" / "coriolanus.txt"
MODELS = REPO_ROOT / "build" / "models"
TRAIN_SHARE = 0.8
WINDOW = 250  # 8 windows = 2,000 positions
KV_BUDGET_GIB = 1.0

# mode -> engine options (the "2:4" mode loads a pruned copy of the checkpoint instead)
MODES = {
    "float32": {},
    "int8": {"quantization": "int8"},
    "nf4": {"quantization": "nf4"},
    "nf4 double-quant": {"quantization": "nf4", "bnb_4bit_double_quant": True},
    "fp4": {"quantization": "fp4"},
    "fp8": {"quantization": "fp8"},
    "w8a8": {"quantization": "w8a8"},
    "w8a8 A=127": {"quantization": "w8a8"},  # 8-bit activation codes, quality only (see run_modes)
    "w8a8 int8 head": {"quantization": "w8a8", "quantize_lm_head": True},
    # compressed-tensors folders written by `python -m engine.compress w8a8` (run_modes), plain and
    # SmoothQuant-smoothed on the training part of the text (never the held-out part)
    "w8a8 checkpoint": {},
    "w8a8 smoothed checkpoint": {},
    "kv fp8": {"kv_cache_dtype": "fp8"},
    "2:4 pruned": {},
}


@dataclass
class Result:
    mode: str
    weight_bytes: int = 0
    kv_tokens: int = 0
    tokens_per_s: float | None = None
    perplexity: float = math.nan
    ppl_ratio: float = math.nan
    agreement: float = math.nan
    kl: float = math.nan
    note: str = ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", default="small", help="random-weight checkpoint preset (engine.demo.checkpoints)"
    )
    parser.add_argument(
        "--checkpoints", nargs="*", default=["random", "trained"], choices=["random", "trained"]
    )
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", default="float32", help="dtype of the compressed runs (reference: float32)"
    )
    parser.add_argument("--positions", type=int, default=2000, help="evaluation positions (multiple of 250)")
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--num-requests", type=int, default=64, help="standard workload size")
    parser.add_argument("--no-throughput", action="store_true", help="skip the tokens/s runs")
    parser.add_argument(
        "--quick", action="store_true", help="tiny preset, 500 positions, 60 steps, 8 requests"
    )
    parser.add_argument(
        "--fp8-quality-on-cpu",
        action="store_true",
        help="measure fp8's quality on CPU through torch._scaled_mm's CPU kernel (the engine itself "
        "refuses fp8 off CUDA; no tokens/s for this row)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.positions, args.train_steps, args.num_requests = "tiny", 500, 60, 8
    if args.positions % WINDOW:
        parser.error(f"--positions must be a multiple of {WINDOW}")

    for kind in args.checkpoints:
        if kind == "random":
            folder = ensure_demo_checkpoint(MODELS, preset=args.preset)
            text_ids = None
        else:
            folder, text_ids = trained_checkpoint(args.train_steps)
        print(f"\n## {kind}: {folder.name} ({args.device}, {args.dtype})", flush=True)
        results = run_modes(folder, args, held_out_ids=text_ids)
        print_table(results, args)


def run_modes(folder: Path, args, held_out_ids: list[int] | None) -> list[Result]:
    reference = _engine(folder, "float32", args.device, {})
    ids = held_out_ids or reference.tokenizer.encode(TEXT.read_text())
    ids = ids[-(args.positions + 1) :]
    if len(ids) < args.positions + 1:
        raise SystemExit(f"the evaluation text has {len(ids)} tokens, fewer than {args.positions + 1}")
    targets = targets_for(ids, WINDOW)
    ref_logits = teacher_forced_logits(reference, ids, WINDOW)
    del reference
    results = []
    for mode in args.modes:
        options = MODES[mode]
        dtype = "float32" if mode == "float32" else args.dtype
        model_folder = pruned_copy(folder) if mode == "2:4 pruned" else folder
        if mode in ("w8a8 checkpoint", "w8a8 smoothed checkpoint"):
            model_folder = w8a8_copy(folder, smooth=mode == "w8a8 smoothed checkpoint")
        fp8_on_cpu = mode == "fp8" and args.device == "cpu" and args.fp8_quality_on_cpu
        # what CPUs with VNNI compute: 8-bit activation codes, here through the float reference kernel
        quality_only = fp8_on_cpu or mode == "w8a8 A=127"
        try:
            with _fp8_device_check_bypassed(fp8_on_cpu), _w8a8_reference_kernel(mode == "w8a8 A=127"):
                engine = _engine(model_folder, dtype, args.device, options)
        except QuantizationError as e:
            results.append(Result(mode, note=f"refused: {e}"))
            print(f"{mode}: refused ({e})", flush=True)
            continue
        report = compare(ref_logits, teacher_forced_logits(engine, ids, WINDOW), targets)
        result = Result(
            mode,
            weight_bytes=model_weight_bytes(engine.runner.model),
            kv_tokens=int(KV_BUDGET_GIB * 2**30) // engine.runner.kv_bytes_per_block * engine.block_size,
            perplexity=report.perplexity,
            ppl_ratio=report.perplexity_ratio,
            agreement=report.greedy_agreement,
            kl=report.kl_divergence,
            note="CPU torch._scaled_mm, quality only" if fp8_on_cpu else _note(engine),
        )
        if mode == "w8a8 A=127":
            result.note = "8-bit activation codes (VNNI CPUs), float reference kernel, quality only"
        if not args.no_throughput and not quality_only:
            del engine  # the quality engine's small pool; throughput gets the usual budget
            engine = _engine(model_folder, dtype, args.device, options, for_throughput=True)
            result.tokens_per_s = run_sluice(
                engine, standard_workload(engine.vocab_size, args.num_requests)
            ).tokens_per_s
        results.append(result)
        print(f"{mode}: {result}", flush=True)
        del engine
    return results


def print_table(results: list[Result], args) -> None:
    print(
        f"\n{args.positions} positions; KV tokens in {KV_BUDGET_GIB:g} GiB; "
        f"tokens/s: standard workload, {args.num_requests} requests, {torch.get_num_threads()} threads"
    )
    print(
        "| mode | weight MiB | KV tokens | output tok/s | perplexity | perplexity ratio | greedy agreement "
        "| KL (nats) | note |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        if r.note.startswith("refused"):
            print(f"| {r.mode} | | | | | | | | {r.note} |")
            continue
        speed = "-" if r.tokens_per_s is None else f"{r.tokens_per_s:.1f}"
        print(
            f"| {r.mode} | {r.weight_bytes / 2**20:.1f} | {r.kv_tokens} | {speed} | {r.perplexity:.1f} | "
            f"{r.ppl_ratio:.4f} | {r.agreement:.4f} | {r.kl:.3g} | {r.note} |"
        )


def trained_checkpoint(steps: int) -> tuple[Path, list[int]]:
    """The checkpoint trained on the text (built once, cached by text + settings), and the held-out token ids."""
    text = TEXT.read_text()
    key = hashlib.sha256(
        f"{text}|{steps}|{TRAIN_CONFIG}|{_SEQ_LEN},{_BATCH},{_LR},{_SEED}".encode()
    ).hexdigest()[:10]
    folder = MODELS / f"trained-coriolanus-{key}"
    if not (folder / "model.safetensors").is_file():
        _train(text, steps, folder)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    cut = int(len(text) * TRAIN_SHARE)
    return folder, tokenizer.encode(text[cut:])


TRAIN_CONFIG = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    intermediate_size=688,
    vocab_size=1024,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)
_SEQ_LEN, _BATCH, _LR, _SEED = 128, 8, 3e-3, 0


def _train(text: str, steps: int, folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cut = int(len(text) * TRAIN_SHARE)
    tokenizer = _train_tokenizer(text[:cut], TRAIN_CONFIG["vocab_size"])
    data = torch.tensor(tokenizer.encode(text[:cut]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same sums in the same order on every machine
    torch.manual_seed(_SEED)
    try:
        config = LlamaConfig(**TRAIN_CONFIG, bos_token_id=1, eos_token_id=2, pad_token_id=3)
        model = LlamaForCausalLM(config).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=_LR, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=_LR, total_steps=steps, pct_start=0.1
        )
        generator = torch.Generator().manual_seed(_SEED)
        start = time.perf_counter()
        for step in range(steps):
            offsets = torch.randint(len(data) - _SEQ_LEN - 1, (_BATCH,), generator=generator)
            batch = torch.stack([data[o : o + _SEQ_LEN] for o in offsets.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 100 == 0 or step == steps - 1:
                print(
                    f"train step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)",
                    flush=True,
                )
    finally:
        torch.set_num_threads(threads)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval().save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)


def _train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([text], trainer=trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@contextlib.contextmanager
def _fp8_device_check_bypassed(active: bool):
    """Only for --fp8-quality-on-cpu: the same layer arithmetic on torch's CPU fp8 kernel."""
    import engine.quant.plan as plan

    check = plan.check_fp8_supported
    if active:
        plan.check_fp8_supported = lambda device: None
    try:
        yield
    finally:
        plan.check_fp8_supported = check


@contextlib.contextmanager
def _w8a8_reference_kernel(active: bool):
    """w8a8 layers built inside multiply through engine.quant.w8a8's float reference kernel, with
    8-bit activation codes (A = 127): the quality of CPUs with VNNI, on any CPU."""
    if not active:
        yield
        return
    from engine.quant import w8a8

    chosen = w8a8.choose_kernel
    w8a8.choose_kernel = lambda: "reference"
    try:
        yield
    finally:
        w8a8.choose_kernel = chosen


def pruned_copy(folder: Path) -> Path:
    out = folder.with_name(folder.name + "-2of4")
    if not (out / "config.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        prune_checkpoint(folder, out)
    return out


def w8a8_copy(folder: Path, smooth: bool) -> Path:
    """A compressed-tensors W8A8 copy of `folder`, written afresh (the writer or the smoothing may
    have changed since a cached one): smoothed on the text's training share, alpha 0.5."""
    out = folder.with_name(folder.name + ("-w8a8-smoothed" if smooth else "-w8a8"))
    shutil.rmtree(out, ignore_errors=True)
    smoothing = None
    if smooth:
        text = TEXT.read_text()
        smoothing = compute_smoothing(folder, text[: int(len(text) * TRAIN_SHARE)])
    compress_w8a8(folder, out, smoothing=smoothing)
    return out


def _engine(folder: Path, dtype: str, device: str, options: dict, for_throughput: bool = False) -> LLMEngine:
    gc.collect()  # engines of earlier modes: their memory goes back before this one sizes its pool
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    # Quality runs need one window's blocks; throughput runs get the usual budget.
    pool = (
        {"kv_cache_memory_gib": 2.0, "gpu_memory_utilization": 0.6}
        if for_throughput
        else {"num_kv_blocks": 64}
    )
    # Quality runs compare every mode on one attention path; flash-attn takes no float32.
    backend = "auto" if for_throughput and dtype != "float32" else "sdpa"
    config = EngineConfig(
        model=str(folder), dtype=dtype, device=device, attention_backend=backend, **pool, **options
    )
    return LLMEngine(config)


def _note(engine: LLMEngine) -> str:
    from engine.layers.linear import LinearBase

    layers = [m for m in engine.runner.model.modules() if isinstance(m, LinearBase)]
    sparse = sum(bool(getattr(m, "is_sparse24", False)) for m in layers)
    pruned = sum(m.quant_method.name == "sparse24" for m in layers)
    if pruned:
        return f"{sparse}/{pruned} layers on sparse kernels"
    return ""


if __name__ == "__main__":
    main()
