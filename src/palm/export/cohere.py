"""A palm model as Cohere's Command-R layout, which Transformers (`CohereForCausalLM`), vLLM and
llama.cpp (`command-r`) run without palm.

A Command-R block is a PaLM block: one weight-only, mean-centred LayerNorm feeding parallel attention
and SwiGLU, no biases, tied embeddings, a logit scale. Three things differ and are carried over here:

- palm's in_proj is one fused matrix [q | k | v | gate | up]; Cohere keeps five.
- palm rotates dimension i with i + head_dim/2, Cohere rotates the pair (2i, 2i+1): the rows of q and
  k are reordered inside each head so that both rotate the same values by the same angles (attention
  scores are unchanged because q and k are reordered alike).
- palm scales hidden states by 1/sqrt(d) before the tied head; Cohere's `logit_scale` does the same
  to the logits, and its default (0.0625) and RoPE theta default (500,000) are not palm's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..core.atomic import atomic_directory
from ..core.errors import CheckpointError
from ..model.config import PalmConfig
from ..text.tokenizer import PalmTokenizer
from ..weights.modeldir import WEIGHTS, WEIGHTS_INDEX, check_config, check_model_dir, quiet_transformers
from .formats import check_type

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
GENERATION_CONFIG = "generation_config.json"  # palm's sampling defaults and its two end ids, kept as they are


def read_config(path: str | Path) -> PalmConfig:
    """The config of a checked palm directory."""
    config_file = check_model_dir(path) / "config.json"
    return check_config(config_file, json.loads(config_file.read_text(encoding="utf-8")))


class StoredWeights(Mapping):
    """palm's weights by name, each read from its safetensors file when asked for and not kept: an export
    holds one stored tensor at a time beside what it writes (at `1b` the fp32 weights are 4 GB)."""

    def __init__(self, folder: Path, files: list[str]):
        from safetensors import safe_open

        self._file: dict[str, Path] = {}
        for name in files:
            with safe_open(str(folder / name), "pt") as f:
                self._file.update(dict.fromkeys(f.keys(), folder / name))

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._file[key]), "pt") as f:  # KeyError for a name no file holds
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file)

    def __len__(self) -> int:
        return len(self._file)


def read_palm(path: str | Path) -> tuple[PalmConfig, StoredWeights]:
    """(config, weights by palm's names, read on demand) of a checked palm directory, from safetensors only."""
    config, path = read_config(path), Path(path)
    index = path / WEIGHTS_INDEX
    files = (
        sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        if index.is_file()
        else [WEIGHTS]
    )
    return config, StoredWeights(path, files)


def rope_pairs_permutation(head_dim: int) -> torch.Tensor:
    """Row order that turns palm's rotate-halves layout into Cohere's interleaved pairs: row 2i takes
    palm's row i and row 2i+1 takes palm's row i + head_dim/2."""
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()


def cohere_config(config: PalmConfig, dtype: torch.dtype):
    """The CohereConfig of the same network."""
    from transformers import CohereConfig

    c = CohereConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        layer_norm_eps=config.layer_norm_eps,
        logit_scale=config.head_scale,
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_bias=False,
        use_qk_norm=False,
        tie_word_embeddings=True,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )
    # Cohere reads head_dim from the config when it is there (palm-540b's 48 x 256 != 18432).
    c.head_dim = config.head_dim
    c.dtype = dtype
    return c


def cohere_weights(
    config: PalmConfig, weights: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """palm's weights under Cohere's names, the fused input matrix split and q/k reordered for its RoPE,
    in `dtype` (None: as stored)."""
    return dict(iter_cohere_weights(config, weights, dtype))


def iter_cohere_weights(
    config: PalmConfig, weights: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """`cohere_weights` one tensor at a time, each read from `weights` once and cast as it is made, so a
    caller that writes each away holds one layer's stored weights at a time."""
    heads, kv, dh, f = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.intermediate_size
    perm = rope_pairs_permutation(dh)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return (t if dtype is None else t.to(dtype)).contiguous()

    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        yield name, cast(weights[name])
    for i in range(config.num_hidden_layers):
        palm, co = f"model.layers.{i}.", f"model.layers.{i}."
        try:
            q, k, v, gate, up = weights[palm + "in_proj.weight"].split((heads * dh, kv * dh, kv * dh, f, f), dim=0)
        except (KeyError, RuntimeError) as e:
            raise CheckpointError(f"layer {i}'s weights do not match its config: {e}") from None
        d = q.shape[1]
        yield co + "input_layernorm.weight", cast(weights[palm + "ln.weight"])
        yield co + "self_attn.q_proj.weight", cast(q.reshape(heads, dh, d)[:, perm].reshape(heads * dh, d))
        yield co + "self_attn.k_proj.weight", cast(k.reshape(kv, dh, d)[:, perm].reshape(kv * dh, d))
        yield co + "self_attn.v_proj.weight", cast(v)
        yield co + "self_attn.o_proj.weight", cast(weights[palm + "attn_out.weight"])
        yield co + "mlp.gate_proj.weight", cast(gate)
        yield co + "mlp.up_proj.weight", cast(up)
        yield co + "mlp.down_proj.weight", cast(weights[palm + "mlp_out.weight"])


def export_dtype(weights: Mapping[str, torch.Tensor], dtype: str | None) -> torch.dtype:
    """The torch dtype of an export type (f32, f16, bf16); None: the stored weights' own."""
    return DTYPES[check_type(dtype, DTYPES)] if dtype else weights["model.norm.weight"].dtype


def load_cohere(path: str | Path, dtype: str | None = None):
    """(palm config, CohereConfig, Cohere state dict) for the palm directory at `path`, cast to `dtype`
    (f32, f16, bf16; None keeps the stored dtype), one stored tensor in memory at a time beside it."""
    config, weights = read_palm(path)
    torch_dtype = export_dtype(weights, dtype)
    state = cohere_weights(config, weights, torch_dtype)
    return config, cohere_config(config, torch_dtype), state


def export_cohere(model: str | Path, out: str | Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write `out`: a Transformers directory that `CohereForCausalLM` loads with palm's logits, and palm's
    tokenizer, which `AutoTokenizer` loads with palm's ids. Written atomically."""
    from transformers import CohereForCausalLM

    model = Path(model)
    _, config, state = load_cohere(model, dtype)
    with torch.device("meta"):
        cohere = CohereForCausalLM(config)
    cohere.load_state_dict(state, strict=False, assign=True)
    cohere.tie_weights()
    missing = {n for n, p in cohere.named_parameters() if p.is_meta}
    if missing:
        raise CheckpointError(f"{model}: no weights for {', '.join(sorted(missing))}")
    with atomic_directory(out, overwrite=overwrite) as tmp, quiet_transformers():
        cohere.save_pretrained(str(tmp))
        PalmTokenizer.load(model).save(tmp)
        if (model / GENERATION_CONFIG).is_file():
            shutil.copyfile(model / GENERATION_CONFIG, tmp / GENERATION_CONFIG)
    return Path(out)
