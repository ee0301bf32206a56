"""Loads a Hugging Face checkpoint folder, with errors that name the file and the reason."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.models import MODEL_REGISTRY, max_context_len

SUPPORTED_ARCHITECTURES = tuple(MODEL_REGISTRY)


class ModelLoadError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """What the engine reads of a checkpoint folder before its weights."""

    hf_config: dict  # config.json (check_checkpoint_folder)
    tokenizer: object
    # generation_config.json's sampling defaults, by SamplingParams field (for front ends to apply)
    generation_defaults: dict[str, float | int]
    vocab_size: int
    architectures: tuple[str, ...]
    max_model_len: int  # the configured max_model_len, at most what the model takes
    eos_token_ids: frozenset[int]


def read_checkpoint(folder: str | Path, max_model_len: int | None = None) -> CheckpointInfo:
    """Check the folder and read its config, tokenizer and generation defaults (ModelLoadError
    naming the file and the reason when one is missing or broken). `max_model_len`: the
    configured one (None: the model's own limit)."""
    hf_config = check_checkpoint_folder(folder)
    tokenizer = load_tokenizer(folder)
    model_limit = max_context_len(hf_config)
    return CheckpointInfo(
        hf_config,
        tokenizer,
        load_generation_defaults(folder),
        hf_config["vocab_size"],
        tuple(hf_config.get("architectures") or ()),
        min(max_model_len or model_limit, model_limit),
        eos_token_ids(hf_config, tokenizer),
    )


def check_checkpoint_folder(folder: str | Path) -> dict:
    """Validate the folder's layout before any heavy loading; returns config.json's contents.

    For a multimodal wrapper (Gemma3ForConditionalGeneration) the contents are its language
    model's: `text_config`'s fields, under the wrapper's own top-level ones (architectures,
    quantization_config, eos_token_id, ...).
    """
    if not str(folder):
        raise ModelLoadError("no model folder given (the engine option `model` is empty)")
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {str(folder)!r} does not exist or is not a folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            f"{config_path}: missing; a model folder needs config.json, safetensors and tokenizer files"
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{config_path}: not valid JSON ({e})") from None
    architectures = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        raise ModelLoadError(
            f"{config_path}: architecture {architectures or 'unspecified'} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if not list(folder.glob("*.safetensors")):
        raise ModelLoadError(f"{folder}: no *.safetensors weight files")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelLoadError(f"{folder}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        config = {**text_config, **{k: v for k, v in config.items() if k != "text_config"}}
    return config


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many types here; the message is what matters
        raise ModelLoadError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


# generation_config.json keys that are sampling defaults, and the SamplingParams field each sets
_GENERATION_DEFAULTS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def load_generation_defaults(folder: str | Path) -> dict[str, float | int]:
    """The checkpoint's sampling defaults from generation_config.json, by SamplingParams field name
    (vLLM's reading: temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens); a
    request's own values override them. Empty when the file is missing or names none."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    return {
        field: config[key]
        for key, field in _GENERATION_DEFAULTS.items()
        if isinstance(config.get(key), int | float) and not isinstance(config.get(key), bool)
    }


def eos_token_ids(hf_config: dict, tokenizer) -> frozenset[int]:
    """The tokens that end a sequence: config.json's `eos_token_id` (one or a list) and the tokenizer's."""
    eos = hf_config.get("eos_token_id")
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
