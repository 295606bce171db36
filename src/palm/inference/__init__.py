"""Decoding: the generator, its compiled step, the static KV cache, int8 weight layouts, sampling,
the continuous-batching engine, structured output, and per-row LoRA adapters.

May import: model, core, text, weights.
"""
