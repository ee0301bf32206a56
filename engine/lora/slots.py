"""LoRASlots: `max_loras` resident adapters on the device, applied to a step's tokens batched per adapter.

Every targeted linear layer (our fused qkv_proj and gate_up_proj included) gets stacked slot
weights: A [max_loras, S * max_lora_rank, in] for a layer fusing S projections (the
projections' A's stacked along the rank dim, so one shrink serves them all) and, per
projection, B [max_loras, rows, max_lora_rank] with the adapter's scaling folded in (each
projection's expand writes only its own rows of the fused output). Ranks below max_lora_rank
and projections an adapter does not target are zeros.

Under tensor parallelism each rank holds its part of every adapter, split as the base weight is
(the layer's output_part / input_part): a column-parallel layer (qkv_proj, gate_up_proj) keeps A
whole and, per projection, the rows of B of the q/k/v heads or gate/up columns the rank holds;
a row-parallel layer (o_proj, down_proj) keeps the rank's columns of A and B whole, and adds
its share x_k A_k^T B^T to its partial output before the layer's all-reduce, which sums the
shares with the partial products: no collective of its own. Under pipeline parallelism a stage
holds only its own layers' parts.

Each step (each micro-batch, under pipeline parallelism) the model runner calls `prepare_step`
once: it loads the step's adapters into slots (least recently used slot evicted first), and
returns the step's plan (engine.lora.mapping: runs of one adapter's tokens, or one padded batch
per slot), which each targeted layer applies through its `output_delta`: a few matmuls per
layer and step, never a loop over requests. Layers find the plan in the step's
AttentionMetadata (engine.forward_context); tokens of no adapter get nothing added. `totals`
counts, for monitoring, the adapters each step found resident (hits) and those it loaded, with
the time the loads took.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from engine.forward_context import get_attention_metadata
from engine.kernels import triton_available
from engine.layers.linear import LinearBase
from engine.lora.adapter import LoRAAdapter, LoRAError
from engine.lora.mapping import LoRAMapping, plan_step
from engine.models.base import PPMissingLayer


@dataclass(slots=True)
class SlotTotals:
    """Since start; written by the thread that runs steps, read by monitoring (plain numbers)."""

    hits: int = 0  # a step's adapter found in a slot, counted once per step that runs it
    loads: int = 0  # a step's adapter copied into a slot (absent, or evicted since)
    load_seconds: float = 0.0  # spent copying them (on CUDA: issuing the copies, which run async)


class _LayerSlots:
    """One linear layer's slot weights, and the output_delta that adds their contribution to its output."""

    def __init__(self, layer: LinearBase, shards: dict, max_loras: int, max_rank: int, device, dtype):
        self.shard_ids = list(shards)
        self.shards = list(shards.values())  # per fused projection: (row offset, rows) of the output
        self.max_rank = max_rank
        width = len(shards) * max_rank
        self.a = torch.zeros(max_loras, width, layer.input_size, device=device, dtype=dtype)
        # the projections' B's stacked by row, [max_loras, out, max_rank], for the Triton expand
        # (one launch for them all); self.b holds each projection's view of it
        out = sum(rows for _, rows in self.shards)
        self.b_stacked = torch.zeros(max_loras, out, max_rank, device=device, dtype=dtype)
        self.b = [self.b_stacked[:, offset : offset + rows] for offset, rows in self.shards]
        # [S + 1] int32: projection i's output rows are bounds[i] .. bounds[i + 1] - 1
        bounds = [offset for offset, _ in self.shards] + [out]
        self.bounds = torch.tensor(bounds, dtype=torch.int32, device=device)
        self.max_rows = max(rows for _, rows in self.shards)

    def load(self, slot: int, weights: dict, scaling: float) -> None:
        """weights: shard id -> (A [r, in], B [rows, r]) of the projections the adapter targets."""
        self.a[slot].zero_()
        for i, shard in enumerate(self.shard_ids):
            self.b[i][slot].zero_()
            if shard in weights:
                a, b = weights[shard]
                r = a.shape[0]
                self.a[slot, i * self.max_rank : i * self.max_rank + r] = a
                self.b[i][slot, :, :r] = b * scaling

    def add_delta(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The layer's output_delta: the step's adapter terms added to this rank's output."""
        # x: [T, in] -> output: [T, out] (row-parallel: partial, before the all-reduce)
        metadata = get_attention_metadata()
        mapping = None if metadata is None else metadata.lora
        if mapping is None:
            return output
        return mapping.apply(self, x, output)


class LoRASlots:
    """The engine's adapters (checked against the model at construction) and their device slots."""

    def __init__(
        self,
        model: nn.Module,
        adapters: dict[str, LoRAAdapter],
        max_loras: int,
        max_rank: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.device = device
        self.max_loras = max_loras
        layers = _target_layers(model)
        # per adapter: our layer name -> {shard id: (A, B)}, checked against the layer's shapes
        packed = dict(getattr(model, "packed_modules_mapping", {}))  # q_proj -> (qkv_proj, "q"), ...
        self.weights = {
            name: _map_to_layers(adapter, model, layers, packed) for name, adapter in adapters.items()
        }
        self.scaling = {name: adapter.scaling for name, adapter in adapters.items()}
        targeted = {layer for per_layer in self.weights.values() for layer in per_layer}
        self.layers: dict[str, _LayerSlots] = {}
        for name in sorted(targeted):
            layer, shards = layers[name]
            self.layers[name] = _LayerSlots(layer, shards, max_loras, max_rank, device, dtype)
            layer.output_delta = self.layers[name].add_delta
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # resident adapters, least recently used first
        self.totals = SlotTotals()
        # the Triton kernels (engine.kernels.triton_lora) on CUDA where triton imports; else torch
        self.use_triton = device.type == "cuda" and triton_available()

    @property
    def names(self) -> list[str]:
        return list(self.weights)

    def prepare_step(self, lora_names: list[str | None], query_lens: list[int]) -> LoRAMapping | None:
        """Load the step's adapters into slots and plan how its layers apply them (one entry per
        sequence in both lists, in batch order); None when no sequence of the step has an adapter."""
        wanted = list(dict.fromkeys(n for n in lora_names if n is not None))
        if not wanted:
            return None
        if len(wanted) > self.max_loras:
            raise RuntimeError(f"a step with {len(wanted)} adapters; max_loras is {self.max_loras}")
        slot_of = {name: self._slot(name, wanted) for name in wanted}
        slots = [-1 if name is None else slot_of[name] for name in lora_names]
        return plan_step(slots, list(query_lens), self.device, use_triton=self.use_triton)

    def _slot(self, name: str, wanted: list[str]) -> int:
        """The adapter's slot, loading it (into a free slot, else the least recently used one that
        this step does not need) when it is not resident."""
        if name in self.slot_of:
            self.slot_of.move_to_end(name)
            self.totals.hits += 1
            return self.slot_of[name]
        start = time.perf_counter()
        if len(self.slot_of) < self.max_loras:
            slot = len(self.slot_of)
        else:
            victim = next(n for n in self.slot_of if n not in wanted)
            slot = self.slot_of.pop(victim)
        for layer_name, layer in self.layers.items():
            layer.load(slot, self.weights[name].get(layer_name, {}), self.scaling[name])
        self.slot_of[name] = slot
        self.totals.loads += 1
        self.totals.load_seconds += time.perf_counter() - start
        return slot


def _target_layers(model: nn.Module) -> dict[str, tuple[LinearBase, dict]]:
    """Our linear layers by name -> (layer, {shard id: (row offset, rows) of this rank's output})."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LinearBase):
            shards, offset = {}, 0
            for shard, rows in module.output_shards.items():
                shards[shard] = (offset, rows)
                offset += rows
            layers[name] = (module, shards)
    return layers


def _map_to_layers(adapter: LoRAAdapter, model: nn.Module, layers: dict, packed: dict) -> dict[str, dict]:
    """The adapter's Hugging Face modules as our layers' shards: full shapes checked, then cut to
    this rank's part as the base weight is (tensor parallel: a column-parallel layer's rows of B,
    a row-parallel layer's columns of A); a pipeline stage keeps only its own layers."""
    other_stages = [name for name, module in model.named_modules() if isinstance(module, PPMissingLayer)]
    mapped: dict[str, dict] = {}
    for module, (a, b) in adapter.weights.items():
        parent, _, leaf = module.rpartition(".")
        ours, shard = packed.get(leaf, (leaf, None))
        layer_name = f"{parent}.{ours}"
        if layer_name not in layers and any(layer_name.startswith(f"{m}.") for m in other_stages):
            continue  # pipeline parallel: the layer lives on another stage, which takes its part
        where = f"LoRA adapter {adapter.name!r}: {adapter.folder}/adapter_model.safetensors: base_model.model.{module}"
        if layer_name not in layers or shard not in layers[layer_name][1]:
            raise LoRAError(f"{where}: the model has no such layer")
        layer = layers[layer_name][0]
        columns, rows = layer.input_part(), layer.output_part(shard)
        if a.shape[1] != columns.total:
            raise LoRAError(
                f"{where}.lora_A.weight has shape {tuple(a.shape)}, expected ({a.shape[0]}, {columns.total})"
            )
        if b.shape[0] != rows.total:
            raise LoRAError(
                f"{where}.lora_B.weight has shape {tuple(b.shape)}, expected ({rows.total}, {b.shape[1]})"
            )
        # clone: the rank keeps its part in host memory, not the whole adapter
        a = a.narrow(1, columns.start, columns.size).clone()  # [r, this rank's in]
        b = b.narrow(0, rows.start, rows.size).clone()  # [this rank's rows, r]
        mapped.setdefault(layer_name, {})[shard] = (a, b)
    return mapped
