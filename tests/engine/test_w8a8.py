"""quantization "w8a8": int8 weights per channel, int8 activations per token, int32 sums (CPU).

The layer equals a float64 reference of the same integer arithmetic up to the final float
rounding (also where u8 x s8 products would saturate an AVX2 int16); a whole tiny model's greedy
tokens equal Transformers' with every projection replaced by that reference (float32 elsewhere);
compressed-tensors checkpoints written by `python -m engine.compress w8a8` load to the very
codes and scales of quantising at load, and Transformers (with the compressed-tensors package)
reads them too.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.compress.__main__ import main as compress_main
from engine.demo.checkpoints import ensure_checkpoint
from engine.layers.linear import ReplicatedLinear
from engine.quant import QuantizationError, make_plan
from engine.quant.plan import model_weight_bytes
from engine.quant.w8a8 import (
    W8A8LinearMethod,
    activation_max,
    choose_kernel,
    quantize_per_token,
    quantize_weight,
)

MAX_TOKENS = 12
NEAR_TIE = 0.02  # logits; the tiny model's best two lie 0.01-3 apart
EPS = torch.finfo(torch.float32).eps


def _layer(in_features: int, out_features: int, bias: bool, seed: int = 0) -> ReplicatedLinear:
    torch.manual_seed(seed)
    layer = ReplicatedLinear(in_features, out_features, bias=bias)
    layer.weight.data.copy_(torch.randn(out_features, in_features) / in_features**0.5)
    if bias:
        layer.bias.data.copy_(torch.randn(out_features))
    return layer


def _reference(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias, act_max: int):
    """float64 of the integer arithmetic: (sum_k x_q w_q) * s_x * s_w + b, and a bound on the float
    rounding the kernel may add (a few float32 ulps of each term)."""
    x_q, x_scale = quantize_per_token(x.float(), act_max)
    sums = x_q.double() @ w_q.double().t()
    y = sums * x_scale.double() * w_scale.double()
    b = torch.zeros(w_q.shape[0], dtype=torch.float64) if bias is None else bias.double()
    return y + b, 8 * EPS * (y.abs() + b.abs())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_int8_layer_equals_a_float64_reference_of_its_integer_arithmetic(rows, bias):
    layer = _layer(320, 96, bias)
    method = W8A8LinearMethod()
    w_q, w_scale = quantize_weight(layer.weight.data, method.weight_max)  # 63 on CPUs without VNNI
    method.process_weights_after_loading(layer)
    layer.quant_method = method
    assert torch.equal(layer.weight_int8, w_q) and torch.equal(layer.weight_scale, w_scale)
    assert layer.w8a8_act_max == 127  # the activations keep 8 bits either way
    x = torch.randn(rows, 320) * torch.logspace(-2, 1, rows)[:, None]  # tokens of unequal size
    y = layer(x)
    expected, tolerance = _reference(x, w_q, w_scale, layer.bias, layer.w8a8_act_max)
    assert y.dtype == torch.float32 and y.shape == (rows, 96)
    assert ((y.double() - expected).abs() <= tolerance).all()


def test_weights_are_symmetric_int8_per_output_channel():
    weight = torch.randn(16, 40)
    w_q, w_scale = quantize_weight(weight)
    assert w_q.dtype == torch.int8 and w_q.abs().max() == 127
    assert torch.equal(w_q.abs().amax(dim=1), torch.full((16,), 127, dtype=torch.int8))
    torch.testing.assert_close(w_scale, weight.abs().amax(dim=1) / 127)
    assert ((w_q.float() * w_scale[:, None] - weight).abs() <= w_scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("checkpoint_codes", [True, False])
def test_sums_stay_exact_where_u8_times_s8_pairs_would_saturate_int16(checkpoint_codes):
    # every code at its largest, pairs of equal sign: on AVX2 (no VNNI) vpmaddubsw would clip
    # pair sums at 32767 past 255 x 64 x 2; a checkpoint's full-range weight codes must get 7-bit
    # activations there, weights quantised at load 7-bit codes and 8-bit activations
    layer = _layer(256, 32, bias=False)
    signs = torch.where(torch.arange(256) % 4 < 2, 1.0, -1.0)
    layer.weight.data.copy_(signs.expand(32, 256) * torch.linspace(0.5, 2, 32)[:, None])
    method = W8A8LinearMethod(prequantized=checkpoint_codes)
    w_q, w_scale = quantize_weight(layer.weight.data, 127 if checkpoint_codes else method.weight_max)
    if checkpoint_codes:  # as a compressed-tensors checkpoint holds them
        method.create_weights(layer)
        layer.weight.data.copy_(w_q)
        layer.weight_scale.data.copy_(w_scale)
    method.process_weights_after_loading(layer)
    assert torch.equal(layer.weight_int8, w_q)
    x = torch.stack([signs * 3, -signs, signs.roll(1)])  # +A, -A codes in runs of two
    y = method.apply(layer, x, None)
    expected, tolerance = _reference(x, w_q, w_scale, None, layer.w8a8_act_max)
    assert ((y.double() - expected).abs() <= tolerance).all()


def test_bfloat16_activations_come_back_bfloat16():
    layer = _layer(64, 24, bias=True)
    method = W8A8LinearMethod()
    method.process_weights_after_loading(layer)
    x = torch.randn(5, 64).to(torch.bfloat16)
    y = method.apply(layer, x, layer.bias)
    expected, _ = _reference(x.float(), layer.weight_int8, layer.weight_scale, layer.bias, layer.w8a8_act_max)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), expected, atol=0.02, rtol=0.01)


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(4, vocab) for _ in range(n - 1)] for n in (1, 5, 17, 40, 64)]


class _ReferenceW8A8(nn.Module):
    """A Transformers nn.Linear as the engine's integers: activations quantised in float32 as the
    engine quantises them, the sums and both scales in float64, rounded once to float32."""

    def __init__(self, linear: nn.Linear, weight_max: int, act_max: int) -> None:
        super().__init__()
        w_q, w_scale = quantize_weight(linear.weight.data, weight_max)
        self.weight_q, self.w_scale, self.act_max = w_q.double(), w_scale.double(), act_max
        self.bias = None if linear.bias is None else linear.bias.data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_q, x_scale = quantize_per_token(x.reshape(-1, shape[-1]), self.act_max)
        y = ((x_q.double() @ self.weight_q.t()) * x_scale.double() * self.w_scale).float()
        y = y if self.bias is None else y + self.bias
        return y.reshape(*shape[:-1], y.shape[-1])


def _engine(folder, **options) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(folder), dtype="float32", kv_cache_memory_gib=0.05, **options))


def _greedy(engine: LLMEngine, prompts) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def w8a8_engine(tiny_checkpoint):
    return _engine(tiny_checkpoint, quantization="w8a8")


@pytest.fixture(scope="module")
def int8_head_engine(tiny_checkpoint):
    return _engine(tiny_checkpoint, quantization="w8a8", quantize_lm_head=True)


@pytest.mark.slow
@pytest.mark.parametrize("int8_head", [False, True])
def test_tiny_model_greedy_tokens_are_transformers_best_running_the_same_integers(
    tiny_checkpoint, request, int8_head
):
    # Rounding activations to integers turns last-bit differences (the engine's float32 sums run
    # in other orders than Transformers') into whole codes now and then, so token-for-token
    # equality holds only where the reference's best token leads clearly: each token the engine
    # generates must be the reference's best, or within NEAR_TIE of it, given the same prefix.
    from transformers import AutoModelForCausalLM

    engine = request.getfixturevalue("int8_head_engine" if int8_head else "w8a8_engine")
    # float32 elsewhere: the engine equals Transformers there token for token (test_engine_exactness)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    down_proj = engine.runner.model.model.layers[0].mlp.down_proj
    weight_max, act_max = down_proj.quant_method.weight_max, down_proj.w8a8_act_max
    for module in list(model.model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, _ReferenceW8A8(child, weight_max, act_max))
    if int8_head:
        model.lm_head = _ReferenceW8A8(model.lm_head, weight_max, act_max)
    prompts = _prompts(model.config.vocab_size)
    same = 0
    for prompt, tokens in zip(prompts, _greedy(engine, prompts), strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens[:-1]])).logits[
                0, len(prompt) - 1 :
            ]  # [MAX_TOKENS, V]
        best = logits.max(dim=-1).values
        chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        assert (best - chosen).max() <= NEAR_TIE, (prompt, tokens, (best - chosen).tolist())
        same += (chosen == best).sum().item()
    assert same >= 0.9 * len(prompts) * MAX_TOKENS


def test_every_projection_runs_int8_and_the_head_stays_float(w8a8_engine):
    model = w8a8_engine.runner.model
    layer = model.model.layers[0]
    for linear in (
        layer.self_attn.qkv_proj,
        layer.self_attn.o_proj,
        layer.mlp.gate_up_proj,
        layer.mlp.down_proj,
    ):
        assert linear.quant_method.name == "w8a8" and linear.weight_int8.dtype == torch.int8
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_an_int8_head_drops_its_float_weight_and_the_lookup_stays_float(
    tiny_checkpoint, w8a8_engine, int8_head_engine
):
    head = int8_head_engine.runner.model.lm_head
    assert head.weight is None and head.weight_int8.dtype == torch.int8
    float_weight = load_file(tiny_checkpoint / "model.safetensors")["lm_head.weight"]
    weight_max = int(head.weight_int8.abs().max())  # 63 on CPUs without VNNI (the module docstring)
    assert torch.equal(head.weight_int8, quantize_weight(float_weight, weight_max)[0])
    vocab, hidden = float_weight.shape
    saved = model_weight_bytes(w8a8_engine.runner.model) - model_weight_bytes(int8_head_engine.runner.model)
    assert saved == vocab * hidden * 4 - (
        vocab * hidden + vocab * 4
    )  # float32 -> int8 codes + a scale per row
    embedding = int8_head_engine.runner.model.model.embed_tokens.weight
    assert embedding.dtype == torch.float32


def test_a_tied_head_goes_int8_and_keeps_the_embedding_s_float_table(model_cache):
    folder = ensure_checkpoint(model_cache, preset="tiny-qwen2")  # tie_word_embeddings
    model = _engine(folder, quantization="w8a8", quantize_lm_head=True).runner.model
    head = model.lm_head
    assert head.weight is model.model.embed_tokens.weight  # the lookup's table, float32 as loaded
    assert head.weight.dtype == torch.float32 and head.weight_int8.dtype == torch.int8
    x = torch.randn(3, model.config.hidden_size) * torch.tensor([[0.1], [1.0], [10.0]])
    act_max = activation_max(choose_kernel(), int(head.weight_int8.abs().max()))
    expected, tolerance = _reference(x, head.weight_int8, head.weight_scale, None, act_max)
    assert ((model.compute_logits(x).double() - expected).abs() <= tolerance).all()


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_an_int8_head_without_w8a8_is_refused_by_name(tiny_checkpoint, quantization):
    config = EngineConfig(
        model=str(tiny_checkpoint), dtype="float32", quantization=quantization, quantize_lm_head=True
    )
    with pytest.raises(QuantizationError, match="quantize_lm_head needs W8A8"):
        make_plan(config, {}, torch.device("cpu"))


@pytest.fixture(scope="module")
def w8a8_folder(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("w8a8") / "tiny-w8a8"
    compress_main(["w8a8", str(tiny_checkpoint), str(out)])
    return out


def test_written_folder_is_a_compressed_tensors_w8a8_checkpoint(w8a8_folder):
    from safetensors import safe_open

    config = json.loads((w8a8_folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "int-quantized"
    group = config["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["weights"]["symmetric"]
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"]
    assert config["ignore"] == ["lm_head"]
    with safe_open(str(w8a8_folder / "model.safetensors"), framework="pt") as f:
        weight = f.get_tensor("model.layers.0.mlp.down_proj.weight")
        scale = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
        assert f.get_tensor("lm_head.weight").dtype == torch.float32
    assert weight.dtype == torch.int8 and scale.shape == (weight.shape[0], 1)


@pytest.fixture(scope="module")
def folder_engine(w8a8_folder):
    return _engine(w8a8_folder)  # quantization "none": the checkpoint's own scheme applies


def test_compressed_tensors_folder_loads_the_writers_codes_and_scales(
    tiny_checkpoint, folder_engine, w8a8_engine
):
    from safetensors import safe_open

    layer = folder_engine.runner.model.model.layers[1]
    with safe_open(str(tiny_checkpoint / "model.safetensors"), framework="pt") as f:
        gate, up, down = (f.get_tensor(f"model.layers.1.mlp.{n}_proj.weight") for n in ("gate", "up", "down"))
    for linear, weight in ((layer.mlp.gate_up_proj, torch.cat([gate, up])), (layer.mlp.down_proj, down)):
        w_q, w_scale = quantize_weight(weight)  # full-range codes, as vLLM's and llm-compressor's
        assert linear.quant_method.name == "w8a8"
        assert torch.equal(linear.weight_int8, w_q) and torch.equal(linear.weight_scale, w_scale)
    if w8a8_engine.runner.model.model.layers[1].mlp.down_proj.quant_method.weight_max == 127:  # VNNI
        prompts = _prompts(4096)  # then quantising at load makes the very same layers
        assert _greedy(folder_engine, prompts) == _greedy(w8a8_engine, prompts)


def test_compressed_tensors_folder_refuses_another_quantization(w8a8_folder):
    with pytest.raises(QuantizationError, match="compressed-tensors W8A8"):
        _engine(w8a8_folder, quantization="int8")


def test_writer_refuses_to_leave_part_of_a_fused_projection_float(tiny_checkpoint, tmp_path):
    from engine.compress import compress_w8a8

    with pytest.raises(ValueError, match="q_proj/k_proj/v_proj"):
        compress_w8a8(tiny_checkpoint, tmp_path / "out", skip_modules=("layers.0.self_attn.q_proj",))


def test_skipped_modules_stay_float_in_the_folder_and_in_the_engine(tiny_checkpoint, tmp_path):
    out = tmp_path / "skip"
    compress_main(["w8a8", str(tiny_checkpoint), str(out), "--skip-modules", "down_proj"])
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == ["lm_head", *(f"model.layers.{i}.mlp.down_proj" for i in range(4))]
    layer = _engine(out).runner.model.model.layers[2]
    assert layer.mlp.down_proj.quant_method.name != "w8a8"
    assert layer.mlp.gate_up_proj.quant_method.name == "w8a8"


@pytest.mark.slow
def test_transformers_reads_the_written_folder_as_the_engine_does(w8a8_folder, folder_engine):
    # Transformers (with the compressed-tensors package) decompresses each projection to
    # codes x scale and quantises its input per token in 8 bits (scale amax / 127.5, the package's
    # rule); the engine's weights must be exactly those, and its tokens Transformers' best or near
    # it. Near: the engine's activation codes differ from the package's (vLLM's amax / 127; on CPUs
    # without VNNI 7 bits, engine.quant.w8a8), so its logits differ by a few hundredths.
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(w8a8_folder, dtype=torch.float32).eval()
    theirs, ours = model.model.layers[3], folder_engine.runner.model.model.layers[3]
    assert torch.equal(_dequantised(theirs.mlp.down_proj), _dequantised(ours.mlp.down_proj))
    q_rows = theirs.self_attn.q_proj.weight.shape[0]
    assert torch.equal(_dequantised(theirs.self_attn.q_proj), _dequantised(ours.self_attn.qkv_proj)[:q_rows])
    near_tie = NEAR_TIE if ours.mlp.down_proj.w8a8_act_max == 127 else 0.15
    prompts = _prompts(model.config.vocab_size)
    same = 0
    for prompt, tokens in zip(prompts, _greedy(folder_engine, prompts), strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :]
        best = logits.max(dim=-1).values
        chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        assert (best - chosen).max() <= near_tie, (prompt, tokens, (best - chosen).tolist())
        same += (chosen == best).sum().item()
    assert same >= 0.75 * len(prompts) * MAX_TOKENS


def _dequantised(linear: nn.Module) -> torch.Tensor:
    """codes x scales [N, K] of an engine layer, or of Transformers' (compressed or decompressed)."""
    weight = getattr(linear, "weight_int8", None)
    weight = linear.weight if weight is None else weight
    if weight.dtype != torch.int8:
        return weight
    return weight.float() * linear.weight_scale.float().reshape(-1, 1)


def test_reference_kernel_multiplies_8_bit_codes_as_the_float64_reference_does():
    # the quality-only kernel (loadtest/bench_quant.py's "w8a8 A=127" row): exact sums for K=320
    layer = _layer(320, 96, bias=True)
    method = W8A8LinearMethod(kernel="reference")
    method.process_weights_after_loading(layer)
    assert method.weight_max == 127 and layer.w8a8_act_max == 127
    x = torch.randn(9, 320)
    expected, tolerance = _reference(x, layer.weight_int8, layer.weight_scale, layer.bias, 127)
    assert ((method.apply(layer, x, layer.bias).double() - expected).abs() <= tolerance).all()
