"""PalmConfig: the shape of a PaLM model, and the presets of Table 1.

This file is copied next to every saved checkpoint (Transformers' `auto_map`), so it imports only
`transformers` and must stay importable without palm installed.
"""

from __future__ import annotations

from transformers import PreTrainedConfig


class ConfigError(ValueError):
    """A configuration that cannot describe a PaLM model."""


# Table 1 of the paper plus small shapes for a laptop. Head size is 256 for the paper's models and
# independent of d_model: for 540B, 48 heads x 256 = 12288 != d_model 18432. d_ff is always 4 x d_model.
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=8192, hidden_size=256, num_hidden_layers=6, num_attention_heads=4, head_dim=64),
    "small": dict(vocab_size=16384, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, head_dim=64),
    "base": dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, head_dim=64),
    "1b": dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, head_dim=128),
    "palm-8b": dict(vocab_size=256000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=16, head_dim=256),
    "palm-62b": dict(vocab_size=256000, hidden_size=8192, num_hidden_layers=64, num_attention_heads=32, head_dim=256),
    "palm-540b": dict(
        vocab_size=256000, hidden_size=18432, num_hidden_layers=118, num_attention_heads=48, head_dim=256
    ),
}


class PalmConfig(PreTrainedConfig):
    """Decoder-only PaLM: parallel attention + SwiGLU blocks, multi-query attention, RoPE, tied embeddings."""

    model_type = "palm"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int | None = None  # None means 4 * hidden_size, as in the paper
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 1  # multi-query attention; any divisor of num_attention_heads gives GQA
    head_dim: int | None = None  # None means hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    # The factor on the tied head's input; None is the paper's 1/sqrt(hidden_size). An imported model
    # keeps its own (Command-R's `logit_scale`).
    logit_scale: float | None = None
    layer_norm_eps: float = 1e-5
    z_loss_coef: float = 1e-4  # PaLM's auxiliary 1e-4 * log(Z)^2; 0 turns it off
    # PaLM pretrains without dropout and fine-tunes with 0.1 (section 5 and 6); these act in training only.
    dropout: float = 0.0  # on each block's attention + MLP output, before the residual add
    attention_dropout: float = 0.0  # on the attention probabilities
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.logit_scale is not None and not self.logit_scale > 0:
            raise ConfigError(f"logit_scale must be positive, got {self.logit_scale}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        super().__post_init__(**kwargs)

    @property
    def head_scale(self) -> float:
        """What the hidden states are multiplied by before the tied head."""
        return self.hidden_size**-0.5 if self.logit_scale is None else self.logit_scale

    @classmethod
    def from_preset(cls, name: str, **overrides) -> PalmConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})
