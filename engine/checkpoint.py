"""Loads a Hugging Face checkpoint folder, with errors that name the file and the reason."""

from __future__ import annotations

import json
from pathlib import Path

from engine.models import MODEL_REGISTRY

SUPPORTED_ARCHITECTURES = tuple(MODEL_REGISTRY)


class ModelLoadError(RuntimeError):
    pass


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
