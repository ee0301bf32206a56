"""Attention sinks (GPT-OSS) in each attention backend: added, or the model refused by name.

The SDPA path's sinks are checked end to end against Transformers (test_moe_models); here the
Triton decode kernel (under Triton's interpreter) is checked against that path, and flash-attn,
which has no sinks, is refused.
"""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig
from engine.demo.checkpoints import ensure_checkpoint
from engine.executor.runtime import ModelTraits, resolve_model_spec, select_backend
from engine.layers import attention_backends
from engine.layers.attention import Attention
from engine.layers.attention_backends import FlashAttentionBackend
from engine.loader.checkpoint import read_checkpoint
from tests.engine.triton_interpreted import run_interpreted


def test_triton_decode_kernel_adds_sinks_as_the_sdpa_path_does():
    out = run_interpreted(
        """
        import torch
        from types import SimpleNamespace
        from tests.engine.triton_interpreted import decode_metadata
        from engine.layers.attention_backends import SdpaBackend
        from engine.kernels.triton_attention import paged_decode_attention
        torch.manual_seed(0)
        S, N, H, Hkv, D = 16, 32, 8, 2, 16
        lens = [1, S - 1, 3 * S + 5, 5 * S]
        tables = torch.randperm(N)[: 4 * 5].view(4, 5).to(torch.int32)
        for window, sinks in ((None, torch.randn(H) * 3), (S + 3, torch.randn(H) * 3), (None, torch.full((H,), 40.0))):
            layer = SimpleNamespace(
                k_cache=torch.randn(N, S, Hkv, D), v_cache=torch.randn(N, S, Hkv, D), scale=0.2,
                sliding_window=window, logits_soft_cap=None, sinks=sinks,
            )
            q = torch.randn(len(lens), H, D)
            md = decode_metadata(lens, tables)
            ctx = md.context_lens_tensor
            expected = SdpaBackend()._decode(layer, q, md)
            got = paged_decode_attention(q, layer.k_cache, layer.v_cache, tables, ctx, 0.2, window, None, sinks)
            print(window, (got - expected).abs().max().item())
        """
    )
    errors = [float(line.split()[1]) for line in out.splitlines()]
    assert len(errors) == 3 and max(errors) < 1e-5, out


def test_flash_backend_refuses_a_layer_with_sinks_when_bound():
    layer = Attention(4, 16, 0.25, 2, sinks=torch.zeros(4))
    with pytest.raises(ValueError, match="attention_backend 'flash' cannot run attention sinks"):
        layer.backend = FlashAttentionBackend()


def test_flash_asked_for_a_model_with_sinks_is_refused_by_name():
    with pytest.raises(ValueError, match="attention_backend 'flash' cannot run attention sinks"):
        select_backend("flash", torch.device("cuda"), traits=ModelTraits(has_sinks=True))


def test_auto_backend_never_picks_flash_for_a_model_with_sinks(monkeypatch):
    monkeypatch.setattr(attention_backends, "flash_attn_available", lambda: True)
    monkeypatch.setattr(attention_backends, "triton_available", lambda: True)
    assert select_backend("auto", torch.device("cuda")) == "flash"
    assert select_backend("auto", torch.device("cuda"), traits=ModelTraits(has_sinks=True)) == "triton"


def test_engine_options_asking_flash_for_gpt_oss_are_refused_before_loading(model_cache):
    folder = str(ensure_checkpoint(model_cache, preset="tiny-gpt-oss"))
    config = EngineConfig(model=folder, device="cuda", attention_backend="flash", block_size=256)
    with pytest.raises(ValueError, match="attention_backend 'flash' cannot run attention sinks"):
        resolve_model_spec(config, read_checkpoint(folder)[0])
