"""A Command-R directory (Transformers' CohereForCausalLM: Command R, Aya 23, Aya Expanse, or what
`palm export --format cohere` wrote) as a palm model directory: cohere.py run backwards.

The five projections become palm's fused in_proj, q and k rows go back from Cohere's interleaved RoPE
pairs to palm's halves, and the model's own logit scale, RoPE theta, grouped K/V heads and tokenizer are
kept. Tensors stream: each is read from its file when its layer is built, and the output is written a
shard at a time, so an import holds about one shard beside the interpreter whatever the model's size.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..core.atomic import atomic_directory
from ..core.errors import CheckpointError, TokenizerError
from ..model.config import ConfigError, PalmConfig
from ..text.tokenizer import PalmTokenizer
from ..weights.modeldir import (
    PICKLED_WEIGHTS,
    WEIGHTS,
    WEIGHTS_INDEX,
    generation_defaults,
    quiet_transformers,
    read_config_json,
)
from .cohere import GENERATION_CONFIG, rope_pairs_permutation

SHARD_BYTES = 2 << 30  # Transformers' default shard size is 5 GB; smaller shards keep an import's peak lower
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)


def palm_config(path: Path) -> PalmConfig:
    """The PalmConfig of the Command-R model in `path`, or a CheckpointError naming what palm cannot run."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import CohereConfig

    config_file, raw, kind = read_config_json(path)
    if kind != "cohere":
        why = (
            " (Cohere2, Command R7B: sliding-window layers without RoPE, which palm's block does not have)"
            if kind == "cohere2"
            else ""
        )
        raise CheckpointError(
            f"{path} holds a {kind!r} model{why}; palm imports Cohere's Command-R layout (model_type 'cohere')"
        )
    try:
        c = CohereConfig.from_dict(raw)
    except (TypeError, ValueError, KeyError, StrictDataclassError) as e:
        raise CheckpointError(f"{config_file} is not a Cohere config: {str(e).splitlines()[-1].strip()}") from None
    refusals = {
        "use_qk_norm": (c.use_qk_norm, "per-head q/k LayerNorms (Command R+)"),
        "attention_bias": (c.attention_bias, "biases on the attention projections"),
        "hidden_act": (c.hidden_act != "silu", f"activation {c.hidden_act!r} (palm's SwiGLU gates with silu)"),
        "tie_word_embeddings": (not c.tie_word_embeddings, "a head apart from the embedding (palm ties them)"),
    }
    rope = c.rope_parameters or {}
    refusals["rope_parameters"] = (
        rope.get("rope_type", "default") != "default",
        f"RoPE scaling {rope.get('rope_type')!r} (palm runs plain RoPE)",
    )
    for field, (refused, what) in refusals.items():
        if refused:
            raise CheckpointError(f"{config_file}: {field} asks for {what}, which palm cannot import")
    try:
        return PalmConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads or c.num_attention_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            max_position_embeddings=c.max_position_embeddings,
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            layer_norm_eps=c.layer_norm_eps,
            logit_scale=float(c.logit_scale),
            pad_token_id=c.pad_token_id,
            bos_token_id=c.bos_token_id,
            eos_token_id=c.eos_token_id,
        )
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file} does not describe a model palm can run: {e}") from None


class Tensors:
    """A Cohere directory's tensors by name, each read from its safetensors file when asked for, its shape
    checked first against what the config calls for."""

    def __init__(self, path: Path):
        index = path / WEIGHTS_INDEX
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index} is corrupt: {e}") from None
        elif (path / WEIGHTS).is_file():
            files = [WEIGHTS]
        elif any((path / p).exists() for p in PICKLED_WEIGHTS):
            raise CheckpointError(
                f"{path} holds pickled weights (pytorch_model.bin), which can run code when "
                "loaded; palm imports safetensors only"
            )
        else:
            raise CheckpointError(f"{path} has no weights ({WEIGHTS} is missing)")
        self.file: dict[str, Path] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        for name in files:
            try:
                with safe_open(str(path / name), "pt") as f:
                    for key in f.keys():
                        self.file[key], self.shape[key] = path / name, tuple(f.get_slice(key).get_shape())
            except (OSError, SafetensorError, ValueError) as e:
                raise CheckpointError(f"{path / name} is not a readable safetensors file ({e})") from None

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.file:
            raise CheckpointError(f"the weights lack {name}")
        if self.shape[name] != shape:
            raise CheckpointError(f"{name} is {self.shape[name]} in the weights, {shape} by config.json")
        with safe_open(str(self.file[name]), "pt") as f:
            return f.get_tensor(name)


def palm_weights(config: PalmConfig, tensors: Tensors) -> Iterator[tuple[str, torch.Tensor]]:
    """palm's weights, one at a time, from Cohere's: the five input projections fused, q/k rows reordered."""
    d, heads, kv, dh, f = (
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.intermediate_size,
    )
    back = torch.argsort(rope_pairs_permutation(dh))
    yield "model.embed_tokens.weight", tensors.get("model.embed_tokens.weight", (config.vocab_size, d))
    yield "model.norm.weight", tensors.get("model.norm.weight", (d,))
    for i in range(config.num_hidden_layers):
        at = f"model.layers.{i}."
        q = tensors.get(at + "self_attn.q_proj.weight", (heads * dh, d))
        k = tensors.get(at + "self_attn.k_proj.weight", (kv * dh, d))
        parts = [
            q.reshape(heads, dh, d)[:, back].reshape(heads * dh, d),
            k.reshape(kv, dh, d)[:, back].reshape(kv * dh, d),
            tensors.get(at + "self_attn.v_proj.weight", (kv * dh, d)),
            tensors.get(at + "mlp.gate_proj.weight", (f, d)),
            tensors.get(at + "mlp.up_proj.weight", (f, d)),
        ]
        if len({p.dtype for p in parts}) > 1:
            raise CheckpointError(f"layer {i}'s projections are stored in different dtypes")
        yield at + "ln.weight", tensors.get(at + "input_layernorm.weight", (d,))
        yield at + "in_proj.weight", torch.cat(parts)
        del q, k, parts
        yield at + "attn_out.weight", tensors.get(at + "self_attn.o_proj.weight", (d, heads * dh))
        yield at + "mlp_out.weight", tensors.get(at + "mlp.down_proj.weight", (d, f))


def write_shards(folder: Path, weights: Iterator[tuple[str, torch.Tensor]], shard_bytes: int = SHARD_BYTES) -> None:
    """Write `weights` into safetensors shards of about `shard_bytes` (one file, and no index, when they fit
    in one), holding one shard in memory at a time."""
    from safetensors.torch import save_file

    shard: dict[str, torch.Tensor] = {}
    names: list[list[str]] = []
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        names.append(list(shard))
        save_file(shard, str(folder / f"shard-{len(names):05d}.safetensors"), metadata={"format": "pt"})
        shard, size = {}, 0

    for name, tensor in weights:
        tensor = tensor.contiguous()
        if shard and size + tensor.nbytes > shard_bytes:
            flush()
        shard[name] = tensor
        size += tensor.nbytes
        total += tensor.nbytes
    if shard:
        flush()
    if len(names) == 1:
        (folder / "shard-00001.safetensors").rename(folder / WEIGHTS)
        return
    weight_map = {}
    for i, keys in enumerate(names, 1):
        final = f"model-{i:05d}-of-{len(names):05d}.safetensors"
        (folder / f"shard-{i:05d}.safetensors").rename(folder / final)
        weight_map.update(dict.fromkeys(keys, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")


def carry_tokenizer(src: Path, out: Path, config: PalmConfig) -> PalmTokenizer:
    """Copy the model's tokenizer files (chat template included) and check that palm can use them."""
    if not (src / "tokenizer.json").is_file():
        raise CheckpointError(f"{src} has no fast tokenizer (tokenizer.json is missing)")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    try:
        tokenizer = PalmTokenizer.load(out)
    except TokenizerError as e:
        raise CheckpointError(f"{src}: {e}") from None
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(f"{src}: the tokenizer has {len(tokenizer)} pieces, the model {config.vocab_size} rows")
    return tokenizer


def import_cohere(model: str | Path, out: str | Path, overwrite: bool = False) -> PalmConfig:
    """Write `out`: a palm model directory with the Command-R model in `model`; atomically, streamed."""
    from transformers import GenerationConfig
    from transformers.dynamic_module_utils import custom_object_save

    from ..model.model import PalmForCausalLM

    src = Path(model)
    config = palm_config(src)
    tensors = Tensors(src)
    dtype = tensors.get("model.norm.weight", (config.hidden_size,)).dtype
    with atomic_directory(out, overwrite=overwrite) as tmp, quiet_transformers():
        carry_tokenizer(src, tmp, config)
        write_shards(tmp, palm_weights(config, tensors))
        config.architectures, config.dtype = ["PalmForCausalLM"], dtype
        with torch.device("meta"):
            custom_object_save(PalmForCausalLM(config), tmp, config=config)  # type: ignore[arg-type]  # the code, and auto_map in config
        config.save_pretrained(str(tmp))
        if (src / GENERATION_CONFIG).is_file():
            generation = GenerationConfig.from_pretrained(str(src))
        else:
            generation = generation_defaults(config)
        generation.save_pretrained(str(tmp))
    return config
