"""Run a palm model where users run models: Cohere's Command-R layout for Transformers and vLLM
(`cohere`), and GGUF for llama.cpp (`gguf`); and bring a Command-R model into palm (`palm import`).

    formats.py   the formats and types `palm export` writes, and ExportError
    cohere.py    palm weights -> CohereForCausalLM's (fused matrix split, RoPE pairs reordered, logit scale)
    importing.py CohereForCausalLM's weights, config and tokenizer -> a palm model directory, streamed
    gguf.py      the Cohere weights -> a `command-r` GGUF file (f32, f16, bf16, q8_0), with the vocabulary
    vocab.py     palm's vocabulary as llama.cpp's tokenizer reads it, and how closely it matches palm's ids
    bytelevel.py a byte-level palm vocabulary whose pre-tokenizer llama.cpp knows by name (exact ids there)
    llamacpp.py  running an exported GGUF with llama-cpp-python: ids in, ids and logits out

May import: model, core, text, weights.
"""

from __future__ import annotations

from .formats import FORMATS, ExportError

__all__ = ["FORMATS", "IMPORT_FORMATS", "ExportError", "export", "import_model"]

IMPORT_FORMATS = ("cohere",)


def export(fmt: str, model, out, dtype: str | None = None, overwrite: bool = False):
    """Write the palm directory `model` to `out` in format `fmt` (see FORMATS); returns what export_* returns."""
    from .formats import check_type

    fmt = check_type(fmt, FORMATS, "format")
    if fmt == "cohere":
        from .cohere import export_cohere

        return export_cohere(model, out, dtype, overwrite=overwrite)
    from .gguf import export_gguf

    return export_gguf(model, out, dtype or "f16", overwrite=overwrite)


def import_model(fmt: str, model, out, overwrite: bool = False):
    """Write the model directory `model`, in format `fmt` (see IMPORT_FORMATS), to `out` as a palm model
    directory; returns its PalmConfig."""
    from .formats import check_type
    from .importing import import_cohere

    check_type(fmt, IMPORT_FORMATS, "format")
    return import_cohere(model, out, overwrite=overwrite)
