"""The demo checkpoints that every test and `make run` build locally.

Presets, architectures, a locally trained tokenizer, and the builder: `python -m engine.demo`.
"""
