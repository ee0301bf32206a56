"""`system_fingerprint`: one string per serving configuration, as OpenAI writes it in a body.

OpenAI's meaning: the backend configuration the answer came from; two answers with different
fingerprints may differ even with the same seed. Sluice's is `fp_` and the first 12 hex digits
of a SHA-256 over what changes the numbers a job gets back: Sluice's version, the checkpoint's
config.json and generation_config.json defaults (as read), and the engine options that change
the arithmetic or the sampling. Options that only size or schedule the work (the KV cache,
batch limits, the device's index) are left out, so replicas of one deployment share one value.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json

from engine import LLMEngine

# EngineConfig fields that change the numbers: the arithmetic (precision, kernels, quantisation,
# how the weights are split) or the sampling of requests without a seed of their own
_OUTPUT_OPTIONS = (
    "dtype",
    "kv_cache_dtype",
    "quantization",
    "int8_threshold",
    "bnb_4bit_double_quant",
    "bnb_4bit_compute_dtype",
    "quantization_skip_modules",
    "quantize_lm_head",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "expert_parallel",
    "seed",
)


def system_fingerprint(engine: LLMEngine) -> str:
    """`fp_` + 12 hex digits, the same for every job this engine answers."""
    config = engine.config
    facts = {
        "sluice": _sluice_version(),
        "config.json": engine.checkpoint.config_json,
        "generation_config.json": engine.generation_defaults,
        "device": config.device.split(":")[0],  # cpu or cuda: which GPU is not part of it
        "attention_backend": engine.attention_backend,  # as resolved ("auto" picks per machine)
        "max_model_len": engine.max_model_len,
        **{name: getattr(config, name) for name in _OUTPUT_OPTIONS},
    }
    canonical = json.dumps(facts, sort_keys=True, default=str).encode()
    return "fp_" + hashlib.sha256(canonical).hexdigest()[:12]


def _sluice_version() -> str:
    try:
        return importlib.metadata.version("sluice")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"
