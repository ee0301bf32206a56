"""Attention backends behind engine.layers.attention.Attention, chosen once at start-up
(engine.executor.runtime.select_backend).

Each reads the step's AttentionMetadata and the layer's paged KV cache
(k_cache, v_cache: [num_blocks, block_size, Hkv, D]); the new tokens' keys and values are
written into their slots first, then each sequence attends over its whole context.

- "sdpa": portable. Gathers each sequence's pages into contiguous keys/values and calls
  PyTorch's scaled_dot_product_attention (its flash / memory-efficient kernels on CUDA, its
  fused kernel on CPU). Decode-only steps run as one padded batch; steps with prompt chunks
  run per sequence, and a fresh prompt skips the gather entirely.
- "triton": SDPA's path for steps with prompt chunks, and a Triton kernel of ours
  (engine.kernels.triton_attention) for decode-only steps, reading the pages in place with no
  host work per step: what makes decode steps capturable as CUDA graphs without flash-attn.
- "cpu": every sequence of a step, prompt chunks and decode rows alike, in one call to our C++
  paged kernel (engine.kernels.cpu_kernels), reading the pages in place. Chosen only for a
  model it serves (no fp8 cache, soft-capped logits or sinks; pages of a multiple of 16 keys):
  the runtime decides that once, at start-up, and binding refuses a layer it cannot run.
- "flash": the flash-attn package's varlen kernel reading the paged cache in place (and its
  split-KV decode kernel for decode-only steps). FlashAttention-2 needs pages of a multiple
  of 256 tokens, which EngineConfig arranges.

Soft-capped attention logits (Gemma 2): SDPA's fused kernels cannot cap, so those layers take
the explicit path (engine.layers.explicit_attention) in "sdpa" and in "triton"'s
prompt steps; the Triton kernel caps in its loop; flash-attn caps with its `softcap` argument
(flash-attn >= 2.6; an older one refuses such a model when the backend is bound).

Attention sinks (GPT-OSS: a learned logit per head in the softmax's denominator): "sdpa" runs
those layers on the explicit path (prompt steps and decode steps alike); "triton" likewise for
prompt steps, and its decode kernel adds the sink to the softmax's denominator; "flash"
refuses such a model when the backend is bound (flash-attn 2 has no sinks), and "auto" does
not choose it for one (engine.executor.runtime.select_backend's `has_sinks`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.forward_context import AttentionMetadata
from engine.kernels import cpu_kernels, paged_decode
from engine.layers.explicit_attention import explicit_attention, explicit_decode
from engine.layers.paged_kv import decode_group_inputs, gather_context, padded_context, write_kv
from engine.quant import kv_cache as fp8_kv


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def flash_attn_has_softcap() -> bool:
    """flash-attn's kernels take `softcap` from version 2.6 on."""
    import flash_attn

    major, minor = (int(part) for part in flash_attn.__version__.split(".")[:2])
    return (major, minor) >= (2, 6)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def make_backend(name: str, compiled_decode: bool = True):
    """The backend's object; `compiled_decode`: SDPA decodes through the compiled paged kernel
    (engine.kernels.paged_decode) unless warming it up shows it cannot run here."""
    if name == "flash":
        return FlashAttentionBackend()
    if name == "triton":
        return TritonBackend(compiled_decode=False)  # decodes through its own kernel: nothing to compile
    if name == "cpu":
        return CpuAttentionBackend()
    return SdpaBackend(compiled_decode)


class SdpaBackend:
    def __init__(self, compiled_decode: bool = True) -> None:
        # decided here and by warm_up only: never switched per step or from outside
        self.compiled_decode = compiled_decode

    def reads_decode_groups(self, query_dtype: torch.dtype, cache_dtype: torch.dtype) -> bool:
        """Whether decode-only steps read md.decode_groups (the runner builds them only then)."""
        return True

    def warm_up(self, layer) -> None:
        """Once the KV cache is bound: compile the decode kernel now (no step waits for it), on
        the layer's cache; where it cannot run (an fp8 cache, no compiler) decode eagerly."""
        if self.compiled_decode:
            self.compiled_decode = not fp8_kv.is_fp8(layer.k_cache) and paged_decode.warm_up(
                (layer.num_heads, layer.head_dim), layer.k_cache, layer.v_cache
            )

    def forward(
        self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: AttentionMetadata
    ) -> torch.Tensor:
        write_kv(layer, k, v, md.slot_mapping)
        return self._attend_written(layer, q, k, v, md)

    def _attend_written(
        self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: AttentionMetadata
    ) -> torch.Tensor:
        if md.is_decode_only:
            return self._decode(layer, q, md)
        out = torch.empty_like(q)
        start = 0
        for i, (query_len, context_len) in enumerate(zip(md.query_lens, md.context_lens, strict=True)):
            end = start + query_len
            if query_len == context_len:  # prefill from scratch: the fresh keys are the whole context
                keys, values = k[start:end], v[start:end]
            else:
                keys, values = gather_context(layer, md.block_tables[i], context_len)
            out[start:end] = _attend(q[start:end], keys, values, layer)
            start = end
        return out

    def _decode(self, layer, q: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        if layer.logits_soft_cap or _sinks(layer) is not None:
            # SDPA can neither cap nor add sinks: the explicit path, on the same padded groups
            return explicit_decode(layer, q, md)
        # Padded batches of sequences with similar context lengths (md.decode_groups): padding
        # costs gather and attention work, and contexts in one step can differ tenfold.
        if len(md.decode_groups) <= 1:
            return self._decode_group(layer, q, md.block_tables, md.context_lens_tensor, md.max_context_len)
        if md.decode_group_inputs is None:
            md.decode_group_inputs = decode_group_inputs(md, layer.k_cache.shape[1])
        order, groups = md.decode_group_inputs
        # one gather of the queries in group order and one scatter back, whatever the group count
        queries = q.index_select(0, order).split([tables.shape[0] for tables, _, _ in groups])
        outs = [
            self._decode_group(layer, rows, tables, lens, max_len)
            for rows, (tables, lens, max_len) in zip(queries, groups, strict=True)
        ]
        return torch.empty_like(q).index_copy_(0, order, torch.cat(outs))

    def _decode_group(
        self, layer, q: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, length: int
    ) -> torch.Tensor:
        # q [B, H, 1, D] against keys [B, Hkv, L, D], padding masked out.
        batch = q.shape[0]
        num_blocks = -(-length // layer.k_cache.shape[1])
        if self.compiled_decode and not fp8_kv.is_fp8(layer.k_cache):
            out = paged_decode.paged_decode_attention(
                q,
                layer.k_cache,
                layer.v_cache,
                block_tables[:, :num_blocks],
                context_lens,
                layer.scale,
                layer.sliding_window,
            )
            if out is not None:  # None: compiling failed (paged_decode says why once): eagerly
                return out
        keys, values, mask = padded_context(layer, block_tables, context_lens, length, q.dtype)
        out = F.scaled_dot_product_attention(
            q.view(batch, 1, *q.shape[1:]).transpose(1, 2),
            keys,
            values,
            attn_mask=mask.view(batch, 1, 1, length),
            scale=layer.scale,
            enable_gqa=q.shape[1] != keys.shape[1],
        )
        return out.transpose(1, 2).reshape(q.shape)


class TritonBackend(SdpaBackend):
    """SDPA for steps with prompt chunks; decode-only steps through the paged Triton kernel."""

    def reads_decode_groups(self, query_dtype: torch.dtype, cache_dtype: torch.dtype) -> bool:
        return False

    def _decode(self, layer, q: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        from engine.kernels.triton_attention import paged_decode_attention

        return paged_decode_attention(
            q,
            layer.k_cache,
            layer.v_cache,
            md.block_tables,
            md.context_lens_tensor,
            layer.scale,
            layer.sliding_window,
            layer.logits_soft_cap,
            _sinks(layer),
        )


class CpuAttentionBackend(SdpaBackend):
    """Every sequence of a step in one call to our C++ paged kernel (engine.kernels.cpu_kernels),
    which reads the paged cache in place. The runtime chose it for a model the kernel serves."""

    def __init__(self) -> None:
        super().__init__(compiled_decode=False)  # the kernel decodes: nothing to compile
        if not cpu_kernels.load():  # found built: the runtime built it before any rank started
            raise RuntimeError(
                f"attention_backend 'cpu': the kernel is unavailable ({cpu_kernels.failure()})"
            )

    def reads_decode_groups(self, query_dtype: torch.dtype, cache_dtype: torch.dtype) -> bool:
        return query_dtype != cache_dtype  # the kernel reads queries in the cache's dtype: else SDPA's path

    def check_layer(self, layer) -> None:
        """Refuse a layer the kernel cannot run (soft-capped logits, sinks): the runtime chooses
        "sdpa" for such a model, so this stops only an engine the rule and the model disagree on."""
        reason = cpu_kernels.cannot_serve(
            soft_caps=bool(layer.logits_soft_cap), has_sinks=_sinks(layer) is not None
        )
        if reason is not None:
            raise ValueError(
                f"attention_backend 'cpu' cannot run this model: {reason}; use attention_backend 'sdpa'"
            )

    def forward(
        self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: AttentionMetadata
    ) -> torch.Tensor:
        write_kv(layer, k, v, md.slot_mapping)
        if q.dtype != layer.k_cache.dtype:  # the kernel reads queries in the cache's dtype
            return self._attend_written(layer, q, k, v, md)
        return cpu_kernels.paged_attention(
            q,
            layer.k_cache,
            layer.v_cache,
            md.block_tables,
            md.cu_query_lens,
            md.context_lens_tensor,
            layer.scale,
            layer.sliding_window,
        )


class FlashAttentionBackend:
    def reads_decode_groups(self, query_dtype: torch.dtype, cache_dtype: torch.dtype) -> bool:
        return False

    def warm_up(self, layer) -> None:
        """Nothing to compile: flash-attn's kernels are built."""

    def check_layer(self, layer) -> None:
        """Refuse a layer flash-attn cannot run: soft-capped logits need flash-attn >= 2.6."""
        if layer.logits_soft_cap and not flash_attn_has_softcap():
            raise ValueError(
                "attention_backend 'flash' cannot soft-cap attention logits (the model's "
                "attn_logit_softcapping) with this flash-attn: it needs flash-attn >= 2.6; "
                "use attention_backend 'triton' or 'sdpa'"
            )
        if layer.sinks is not None:
            raise ValueError(
                "attention_backend 'flash' cannot run attention sinks (the model's per-head "
                "`sinks`, GPT-OSS): flash-attn 2 has no sink logits; use attention_backend 'triton' or 'sdpa'"
            )

    def forward(
        self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: AttentionMetadata
    ) -> torch.Tensor:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        write_kv(layer, k, v, md.slot_mapping)
        # the kernels' options, causal (aligned bottom-right, so a chunk attends to its cached
        # context too), a sliding window and a soft-cap (0: none) where the layer has them
        options = {
            "softmax_scale": layer.scale,
            "causal": True,
            "window_size": (-1, -1) if layer.sliding_window is None else (layer.sliding_window - 1, 0),
            "softcap": layer.logits_soft_cap or 0.0,
            "block_table": md.block_tables,
        }
        if md.is_decode_only:
            out = flash_attn_with_kvcache(
                q.unsqueeze(1), layer.k_cache, layer.v_cache, cache_seqlens=md.context_lens_tensor, **options
            )
            return out.squeeze(1)
        return flash_attn_varlen_func(
            q,
            layer.k_cache,
            layer.v_cache,
            cu_seqlens_q=md.cu_query_lens,
            cu_seqlens_k=md.cu_context_lens,
            max_seqlen_q=md.max_query_len,
            max_seqlen_k=md.max_context_len,
            **options,
        )


def _sinks(layer) -> torch.Tensor | None:
    return getattr(layer, "sinks", None)  # [H] sink logits (GPT-OSS), or None


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layer) -> torch.Tensor:
    """q [Q, H, D] are the last Q of L positions; keys/values [L, Hkv, D]; causal (+ window)."""
    num_queries, length = q.shape[0], keys.shape[0]
    sliding_window, soft_cap = layer.sliding_window, layer.logits_soft_cap
    explicit = bool(soft_cap) or _sinks(layer) is not None
    mask = None
    if explicit or num_queries != length or (sliding_window is not None and sliding_window < length):
        query_pos = torch.arange(length - num_queries, length, device=q.device).unsqueeze(1)
        key_pos = torch.arange(length, device=q.device).unsqueeze(0)
        mask = key_pos <= query_pos
        if sliding_window is not None:
            mask &= key_pos > query_pos - sliding_window
    q, keys, values = q.transpose(0, 1), keys.to(q.dtype).transpose(0, 1), values.to(q.dtype).transpose(0, 1)
    if explicit:
        return explicit_attention(q, keys, values, mask, layer.scale, soft_cap, _sinks(layer)).transpose(0, 1)
    out = F.scaled_dot_product_attention(
        q,
        keys,
        values,
        attn_mask=mask,
        is_causal=mask is None,
        scale=layer.scale,
        enable_gqa=q.shape[0] != keys.shape[0],
    )
    return out.transpose(0, 1)
