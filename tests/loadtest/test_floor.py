"""The benchmarks' floor (loadtest/floor.py): the least time any engine could take, so prompt
tokens a prefix cache skips are not counted."""

from __future__ import annotations

import json

import pytest
import torch

from loadtest.floor import Machine, cached_prefix_lens, workload_floor
from loadtest.workloads import WORKLOADS, Workload

MACHINE = Machine(matmul_flops_per_s=1e12, copy_bytes_per_s=1e10)
CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "vocab_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
}


@pytest.fixture
def checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    return tmp_path


def test_a_prompt_counts_only_what_no_earlier_prompt_began_with():
    shared = list(range(10, 110))
    prompts = [[*shared, 1, 2, 3], [*shared, 4, 5], [7, 8, 9], [*shared, 1, 2, 3]]
    # the second shares 100 tokens; the third none; the fourth repeats the first: all but its last
    assert cached_prefix_lens(prompts) == [0, 100, 0, 102]


def test_shared_prefixes_lower_the_prefill_floor_and_nothing_else(checkpoint):
    own = [[11 + i] * 20 for i in range(4)]
    instruction = list(range(100, 356))
    distinct = Workload("distinct", [[i + 1, *prompt, *instruction] for i, prompt in enumerate(own)], [8] * 4)
    shared = Workload("shared", [[*instruction, *prompt] for prompt in own], [8] * 4)
    assert distinct.num_prompt_tokens == shared.num_prompt_tokens + 4
    apart = workload_floor(checkpoint, distinct, torch.float32, MACHINE)
    together = workload_floor(checkpoint, shared, torch.float32, MACHINE)
    assert together.prefill_s < apart.prefill_s / 2  # 3 of 4 prompts skip 256 of their 276 tokens
    assert together.decode_s == pytest.approx(apart.decode_s, rel=0.02)


def test_the_standard_workload_shares_only_its_first_token():
    prompts = WORKLOADS["standard"](32000, 64).prompts
    assert cached_prefix_lens(prompts) == [0] + [1] * 63  # every prompt begins with token 1


def test_the_shared_prefix_workload_skips_its_instruction_after_the_first_prompt():
    prompts = WORKLOADS["shared-prefix"](32000, 64).prompts
    assert cached_prefix_lens(prompts) == [0] + [256] * 63


INT8_MACHINE = Machine(matmul_flops_per_s=1e12, copy_bytes_per_s=1e10, int8_ops_per_s=2e12)


def test_int8_projections_count_at_the_int8_rate_and_one_byte_a_weight(checkpoint):
    workload = Workload("w", [list(range(1, 65))] * 2, [4, 4])
    float_floor = workload_floor(checkpoint, workload, torch.float32, INT8_MACHINE)
    assert workload_floor(checkpoint, workload, torch.float32, MACHINE) == float_floor  # no int8 rate needed
    int8 = workload_floor(checkpoint, workload, torch.float32, INT8_MACHINE, "int8")
    with_head = workload_floor(checkpoint, workload, torch.float32, INT8_MACHINE, "int8+head")
    c = CONFIG
    projections = c["num_hidden_layers"] * c["hidden_size"] * (2 * 64 + 2 * 32 + 3 * c["intermediate_size"])
    head = c["vocab_size"] * c["hidden_size"]
    # prefill: the projections' FLOPs at twice the rate, the head's too only with "int8+head"
    projection_s = 2 * projections * 65 / 1e12  # 64 + 1 tokens: the second prompt repeats the first
    assert float_floor.prefill_s - int8.prefill_s == pytest.approx(projection_s / 2)
    assert int8.prefill_s - with_head.prefill_s == pytest.approx(2 * head * 2 / 1e12 / 2)
    # decode (bound by reading the weights here): 4 bytes a weight -> 1, the head's with "int8+head"
    steps = 3
    assert float_floor.decode_s - int8.decode_s == pytest.approx(steps * projections * 3 / 1e10)
    assert int8.decode_s - with_head.decode_s == pytest.approx(steps * head * 3 / 1e10)


def test_an_int8_floor_without_a_measured_int8_rate_is_refused(checkpoint):
    with pytest.raises(ValueError, match="int8 rate"):
        workload_floor(checkpoint, Workload("w", [[1, 2]], [2]), torch.float32, MACHINE, "int8")


def test_a_benchmark_variant_names_its_engine_options_and_its_floor():
    from loadtest.bench_engine import arithmetic, variant_options

    options = variant_options("float32:w8a8+quantize_lm_head=true+max_num_seqs=64")
    assert options == {
        "dtype": "float32",
        "quantization": "w8a8",
        "quantize_lm_head": True,
        "max_num_seqs": 64,
    }
    assert arithmetic(options) == "int8+head"
    assert arithmetic(variant_options("float32:w8a8")) == "int8"
    assert arithmetic(variant_options("bfloat16")) == "float"
