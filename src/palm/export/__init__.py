"""Run a palm model where users run models: Cohere's Command-R layout for Transformers and vLLM
(`cohere`), and GGUF for llama.cpp (`gguf`).

    formats.py   the formats and types `palm export` writes, and ExportError
    cohere.py    palm weights -> CohereForCausalLM's (fused matrix split, RoPE pairs reordered, logit scale)
    gguf.py      the Cohere weights -> a `command-r` GGUF file (f32, f16, bf16, q8_0), with the vocabulary
    vocab.py     palm's vocabulary as llama.cpp's tokenizer reads it, and how closely it matches palm's ids
    bytelevel.py a byte-level palm vocabulary whose pre-tokenizer llama.cpp knows by name (exact ids there)
    llamacpp.py  running an exported GGUF with llama-cpp-python: ids in, ids and logits out
"""

from __future__ import annotations

from .formats import FORMATS, ExportError

__all__ = ["FORMATS", "ExportError", "export"]


def export(fmt: str, model, out, dtype: str | None = None, overwrite: bool = False):
    """Write the palm directory `model` to `out` in format `fmt` (see FORMATS); returns what export_* returns."""
    from .formats import check_type

    fmt = check_type(fmt, FORMATS, "format")
    if fmt == "cohere":
        from .cohere import export_cohere

        return export_cohere(model, out, dtype, overwrite=overwrite)
    from .gguf import export_gguf

    return export_gguf(model, out, dtype or "f16", overwrite=overwrite)
