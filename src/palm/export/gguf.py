"""A palm model as one GGUF file for llama.cpp: architecture `command-r`, written with the `gguf` package.

The weights are the Cohere layout's (cohere.py), which is what llama.cpp's `command-r` computes:
interleaved RoPE pairs, a mean-centred LayerNorm, parallel attention and SwiGLU, the tied embedding as
the output matrix, and the logit scale. Tensor names come from gguf's own map for the architecture.
1-D tensors (the LayerNorm scales) stay F32 in every type, as llama.cpp's converter keeps them; q8_0
falls back to F16 for a matrix whose rows are not a whole number of 32-value blocks, as it does too.

llama.cpp's `command-r` cannot run two shapes that palm has: 64 or more layers (it then requires
q/k LayerNorm weights, which palm does not have) and heads x head_dim != d_model (palm-540b: its
attention matrices are read as d_model x d_model). Those are refused before anything is written;
the Cohere layout loads both in Transformers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from ..core.atomic import OutputError, atomic_file
from ..model.config import PalmConfig
from ..text.tokenizer import PalmTokenizer
from .cohere import iter_cohere_weights, read_config, read_palm
from .formats import GGUF_TYPES, ExportError, check_type
from .vocab import LlamaVocab, llama_vocab

log = logging.getLogger(__name__)

ARCH = "command-r"
QK_NORM_LAYERS = 64  # llama.cpp's command-r wants q/k norm tensors from this many layers on


def check_runnable(config: PalmConfig) -> None:
    """An ExportError, in one line, for the shapes llama.cpp's `command-r` cannot run."""
    if config.num_hidden_layers >= QK_NORM_LAYERS:
        raise ExportError(
            f"llama.cpp's command-r cannot run {config.num_hidden_layers} layers: from {QK_NORM_LAYERS} layers on it "
            "requires q/k LayerNorm weights, which palm does not have (use --format cohere for Transformers)"
        )
    if config.num_attention_heads * config.head_dim != config.hidden_size:
        raise ExportError(
            f"llama.cpp's command-r needs heads x head_dim = d_model, and this model has {config.num_attention_heads} "
            f"x {config.head_dim} != {config.hidden_size} (use --format cohere for Transformers)"
        )


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError("writing GGUF needs the gguf package: pip install 'palm[gguf]'") from None
    return gguf


def _tensor(gguf, array: np.ndarray, kind: str):
    """(data, raw dtype) of one tensor in the file's type."""
    q = gguf.GGMLQuantizationType
    if array.ndim == 1 or kind == "f32":
        return array.astype(np.float32), q.F32
    if kind == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0] == 0:
        return gguf.quants.quantize(array, q.Q8_0), q.Q8_0
    if kind == "bf16":
        return gguf.quants.quantize(array, q.BF16), q.BF16
    return array.astype(np.float16), q.F16


def _metadata(gguf, name: str, config: PalmConfig, kind: str, vocab: LlamaVocab, ids) -> dict:
    """GGUFWriter's `add_*` methods (less the prefix) and what each is given: the network as llama.cpp's
    command-r reads it, and the vocabulary as its BPE tokenizer does."""
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
    c = config
    return {
        "name": name,
        "context_length": c.max_position_embeddings,
        "embedding_length": c.hidden_size,
        "block_count": c.num_hidden_layers,
        "feed_forward_length": c.intermediate_size,
        "head_count": c.num_attention_heads,
        "head_count_kv": c.num_key_value_heads,
        "key_length": c.head_dim,
        "value_length": c.head_dim,
        "rope_dimension_count": c.head_dim,
        "rope_freq_base": c.rope_theta,
        "layer_norm_eps": c.layer_norm_eps,
        "logit_scale": c.head_scale,
        "file_type": getattr(gguf.LlamaFileType, file_types[kind]),
        "quantization_version": gguf.GGML_QUANT_VERSION,
        "tokenizer_model": "gpt2",
        "tokenizer_pre": vocab.pre,
        "token_list": vocab.tokens,
        "token_types": vocab.types,
        "token_merges": vocab.merges,
        "bos_token_id": ids.bos_id,
        "eos_token_id": ids.eos_id,
        "eot_token_id": ids.eod_id,  # palm stops at the end of a document too
        "unk_token_id": ids.unk_id,
        "pad_token_id": ids.pad_id,
        "add_bos_token": True,
        "add_eos_token": False,
    }


def export_gguf(model: str | Path, out: str | Path, kind: str = "f16", overwrite: bool = False) -> LlamaVocab:
    """Write `out`, a GGUF file of the palm directory `model` in `kind` (f32, f16, bf16, q8_0), atomically.

    Returns the vocabulary written, whose `exact` and `note` say how closely llama.cpp's own tokenizer
    follows palm's (palm's ids fed to llama.cpp are always exact).
    """
    kind = check_type(kind, GGUF_TYPES)
    _gguf()
    model, out = Path(model), Path(out)
    check_runnable(read_config(model))
    if out.is_dir():
        raise OutputError(f"{out} is a folder; give the GGUF file's name (for example {out / 'model.gguf'})")
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists (pass --force to replace it)")
    config, weights = read_palm(model)
    tokenizer = PalmTokenizer.load(model)
    if not tokenizer.own:
        raise ExportError(
            f"{model}: its tokenizer is not a palm vocabulary (an imported model's); GGUF export "
            "writes palm's vocabularies only -- convert the original model with llama.cpp's own script"
        )
    if len(tokenizer) != config.vocab_size:
        raise ExportError(f"{model}: the tokenizer has {len(tokenizer)} pieces and the model {config.vocab_size} rows")
    vocab = llama_vocab(tokenizer)
    # one stored tensor at a time: each is converted to the file's type as it is read
    write_gguf(
        out, config, iter_cohere_weights(config, weights, torch.float32), vocab, tokenizer, kind, model.resolve().name
    )
    if not vocab.exact:
        log.warning(vocab.note)
    return vocab


def write_gguf(
    out: Path,
    config: PalmConfig,
    state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    vocab: LlamaVocab,
    ids,
    kind: str,
    name: str,
) -> None:
    """Write Cohere-named weights `state` (a mapping, or (name, tensor) pairs, which are converted to the
    file's type one at a time) and `vocab` as the GGUF file `out`; `ids` has palm's special ids (pad_id,
    bos_id, eos_id, unk_id, eod_id, as a PalmTokenizer does)."""
    gguf = _gguf()
    check_runnable(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.COMMAND_R, config.num_hidden_layers)
    with atomic_file(out, "wb") as f:
        # GGUFWriter would open a path of its own; handing it atomic_file's open temporary file instead
        # keeps the fsync-and-rename (and so a failed export leaves nothing behind).
        writer = gguf.GGUFWriter(None, ARCH)
        for key, value in _metadata(gguf, name, config, kind, vocab, ids).items():
            getattr(writer, f"add_{key}")(value)
        for hf_name, tensor in state.items() if isinstance(state, Mapping) else state:
            if hf_name == "model.embed_tokens.weight" and vocab.extra_rows:
                tensor = torch.cat([tensor, tensor[vocab.extra_rows]])
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
            if gguf_name is None:
                raise ExportError(f"gguf has no {ARCH} name for {hf_name}")
            data, dtype = _tensor(gguf, tensor.detach().float().numpy(), kind)
            writer.add_tensor(gguf_name, data, raw_dtype=dtype)
        writer.fout, writer.state = [f], gguf.gguf_writer.WriterState.EMPTY
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.flush()
