"""Multi-LoRA: PEFT adapters read at start-up, held in `max_loras` slots, applied batched per adapter."""

from engine.lora.adapter import LoRAAdapter, LoRAError, read_adapter
from engine.lora.mapping import LoRAMapping
from engine.lora.slots import LoRASlots

__all__ = ["LoRAAdapter", "LoRAError", "LoRAMapping", "LoRASlots", "read_adapter"]
