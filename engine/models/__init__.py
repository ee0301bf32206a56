"""Model implementations, looked up by the `architectures` entry of a checkpoint's config.json.

Each module here is one family: it lists the architectures it serves in a module-level
`ARCHITECTURES` dict (name -> class, a subclass of engine.models.base.DecoderForCausalLM).
The registry collects them all, so adding a family is adding its module.
"""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from engine.layers.rotary import config_context_len


def _collect() -> dict[str, type[nn.Module]]:
    registry: dict[str, type[nn.Module]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for name, model_class in getattr(module, "ARCHITECTURES", {}).items():
            if name in registry:
                raise RuntimeError(f"architecture {name} is registered twice (engine/models/{info.name}.py)")
            registry[name] = model_class
    return dict(sorted(registry.items()))


MODEL_REGISTRY: dict[str, type[nn.Module]] = _collect()


def model_class_for(architectures: list[str] | None) -> type[nn.Module]:
    """The class for the first supported name in `architectures`; ValueError if there is none."""
    for name in architectures or []:
        if name in MODEL_REGISTRY:
            return MODEL_REGISTRY[name]
    raise ValueError(
        f"architecture {architectures or 'unspecified'} is not supported; "
        f"supported: {', '.join(MODEL_REGISTRY)}"
    )


def max_context_len(config: dict) -> int:
    """The longest prompt + output a checkpoint takes, from its config.json's contents:
    max_position_embeddings, or more for the RoPE scalings that extend it (YaRN, dynamic NTK;
    engine.layers.rotary.rope_context_len)."""
    return config_context_len(config)
