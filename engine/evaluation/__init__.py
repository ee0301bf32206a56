"""Measuring an engine configuration's output against a reference.

Teacher-forced logits and the quality targets of the compressed modes (bench_quant, the
quantisation tests).
"""
