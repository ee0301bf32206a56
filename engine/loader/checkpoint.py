"""What the engine reads of a checkpoint folder before its weights, read once per engine start.

`read_checkpoint` checks the folder, reads config.json (once: `read_config_json` is the one
function that opens it), generation_config.json and the tokenizer, and returns the facts as a CheckpointInfo (plain, picklable data) beside the
tokenizer. Rank 0 hands the facts down: to runtime resolution, the quantisation plan, the
parallel layout check, the executor and, in a spawned worker's arguments, to every rank's weight
loading. The tokenizer stays in rank 0's process. Every error names the file and the reason.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from engine.models import MODEL_REGISTRY, max_context_len, model_class_for

SUPPORTED_ARCHITECTURES = tuple(MODEL_REGISTRY)


class ModelLoadError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """A checkpoint folder's facts: what every rank needs of it besides the weights."""

    folder: str
    config_json: dict  # config.json as written (transformers' config object is built from it)
    # its language model's fields (a multimodal wrapper's text_config under the wrapper's own
    # top-level ones): what the engine's checks read (the parallel layout, the context length,
    # the quantisation plan: `quantization_config`, the 2:4 marker)
    hf_config: dict
    architectures: tuple[str, ...]
    # generation_config.json's sampling defaults, by SamplingParams field (for front ends to apply)
    generation_defaults: dict[str, float | int]
    vocab_size: int
    max_model_len: int  # the configured max_model_len, at most what the model takes
    eos_token_ids: frozenset[int]  # config.json's eos_token_id (one or a list) and the tokenizer's

    @property
    def model_class(self) -> type:
        """The engine's class for the first supported name in `architectures`."""
        return model_class_of(self.folder, self.architectures)

    @property
    def has_attention_sinks(self) -> bool:
        """Whether the model has per-head attention sinks (GPT-OSS), which flash-attn cannot run."""
        return self.model_class.has_attention_sinks

    def pretrained_config(self):
        """transformers' config object, built from `config_json` (the file is not read again)."""
        return pretrained_config(self.folder, self.config_json)


def read_checkpoint(folder: str | Path, max_model_len: int | None = None) -> tuple[CheckpointInfo, object]:
    """Check the folder and read its config, tokenizer and generation defaults: (the facts, the
    tokenizer). ModelLoadError naming the file and the reason when one is missing or broken.
    `max_model_len`: the configured one (None: the model's own limit)."""
    config_json = _checked_config_json(folder)
    hf_config = language_model_fields(config_json)
    tokenizer = load_tokenizer(folder, pretrained_config(folder, config_json))
    model_limit = max_context_len(hf_config)
    facts = CheckpointInfo(
        folder=str(folder),
        config_json=config_json,
        hf_config=hf_config,
        architectures=tuple(hf_config.get("architectures") or ()),
        generation_defaults=load_generation_defaults(folder),
        vocab_size=hf_config["vocab_size"],
        max_model_len=min(max_model_len or model_limit, model_limit),
        eos_token_ids=eos_token_ids(hf_config, tokenizer),
    )
    return facts, tokenizer


def check_checkpoint_folder(folder: str | Path) -> dict:
    """Validate the folder's layout before any heavy loading; returns its language model's config
    fields (language_model_fields of config.json). For tools that need no more than that
    (engine.compress); the engine reads a folder with read_checkpoint."""
    return language_model_fields(_checked_config_json(folder))


def language_model_fields(config_json: dict) -> dict:
    """config.json's contents as the engine's checks read them. For a multimodal wrapper
    (Gemma3ForConditionalGeneration) its language model's: `text_config`'s fields, under the
    wrapper's own top-level ones (architectures, quantization_config, eos_token_id, ...)."""
    text_config = config_json.get("text_config")
    if isinstance(text_config, dict):
        return {**text_config, **{k: v for k, v in config_json.items() if k != "text_config"}}
    return config_json


def read_config_json(folder: str | Path) -> dict:
    """config.json's contents, as written: the one function of the engine that opens it
    (ModelLoadError naming the file when it is missing or not JSON)."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            f"{config_path}: missing; a model folder needs config.json, safetensors and tokenizer files"
        )
    try:
        return json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{config_path}: not valid JSON ({e})") from None


def _checked_config_json(folder: str | Path) -> dict:
    """The folder checked (config.json, a supported architecture, weights and tokenizer files)
    and config.json's contents."""
    if not str(folder):
        raise ModelLoadError("no model folder given (the engine option `model` is empty)")
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {str(folder)!r} does not exist or is not a folder")
    config = read_config_json(folder)
    architectures = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        raise ModelLoadError(
            f"{folder / 'config.json'}: architecture {architectures or 'unspecified'} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if not list(folder.glob("*.safetensors")):
        raise ModelLoadError(f"{folder}: no *.safetensors weight files")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelLoadError(f"{folder}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    return config


def model_class_of(folder: str | Path, architectures) -> type:
    """The engine's class for the first supported name in config.json's `architectures`."""
    try:
        return model_class_for(list(architectures or ()))
    except ValueError as e:
        raise ModelLoadError(f"{Path(folder) / 'config.json'}: {e}") from None


def pretrained_config(folder: str | Path, config_json: dict):
    """transformers' config object for config.json's contents, built as AutoConfig.from_pretrained
    builds it from the file."""
    from transformers import CONFIG_MAPPING

    config = copy.deepcopy(config_json)  # transformers may rewrite nested fields in place
    # AutoConfig's own rule: a "mistral" config with per-layer attention types is Ministral's
    if config.get("model_type") == "mistral" and "layer_types" in config:
        config["model_type"] = "ministral"
    try:
        return CONFIG_MAPPING[config["model_type"]].from_dict(config, name_or_path=str(folder))
    except (KeyError, ValueError, TypeError) as e:
        raise ModelLoadError(
            f"{Path(folder) / 'config.json'}: cannot read the config ({type(e).__name__}: {e})"
        ) from None


def load_tokenizer(folder: str | Path, config):
    """The folder's tokenizer. `config`: transformers' config object for the folder (given, it
    spares transformers reading config.json once more)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, config=config)
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
