"""The PaLM network (Chowdhery et al. 2022, section 2), top to bottom.

    x -> Embedding (N(0,1), no LayerNorm) -> L x ParallelBlock -> LayerNorm -> tied head / sqrt(d) -> logits
    ParallelBlock: y = x + Attn(LN(x)) + SwiGLU(LN(x)), one LN, one fused input matmul, no biases

Attention goes through Transformers' attention interface (`attn_implementation` = "sdpa", "eager",
"flex_attention", or any registered kernel), masks through `create_causal_mask` (2D padding masks,
4D masks, dynamic and static caches), and `output_hidden_states` / `output_attentions` through
Transformers' output capturing. The forward pass has no data-dependent Python branches, so
`torch.export` and `torch.compile(fullgraph=True)` take it whole.

This file is copied next to every saved checkpoint (Transformers' `auto_map`), so it imports only
torch, transformers and its own relative imports, and loads with `trust_remote_code=True` where
palm is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .config import PalmConfig
from .loss import IGNORE_INDEX, fused_lm_loss, lm_loss

# Transformers 5.24 renamed the KV-cache argument and output field `past_key_values` -> `cache`.
CACHE_FIELD = "cache"
renamed_cache_kwarg = deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")

__all__ = ["CACHE_FIELD", "IGNORE_INDEX", "PalmForCausalLM", "PalmModel", "PalmPreTrainedModel", "lm_loss"]


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, 1, T, head_dim / 2] in fp32 for absolute positions [B, T].

    Computed from the config on every call rather than kept in a buffer: Transformers 5 refills
    non-persistent buffers with garbage after a meta-device load, and `.to(bf16)` would round them.
    """
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    freqs = (position_ids.float()[..., None] * inv_freq)[:, None]
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate dimension i with i + head_dim/2 (the GPT-NeoX / Llama layout) by the angle of its pair.

    Written on the two halves, so no rotated copy of x is built (the usual cat([-x2, x1]) * sin);
    the result is the same to the bit.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _causal_when_unmasked(module, query, key, value, attention_mask, is_causal):
    """Transformers' convention for a missing mask: causal for a multi-token query, and an empty static
    cache's unwritten tail cut off (so SDPA can take its `is_causal` fast path)."""
    q_len = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = q_len > 1 and attention_mask is None and causal  # shape first: a SymBool must not leak out
    if causal and key.shape[2] > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    return key, value, causal


def sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """Transformers' "sdpa" attention, but the shared K/V head is never copied per query head.

    One decoding query packs its heads into the query axis ([B, KV, H/KV, D] against the KV heads),
    which needs no mask change; longer queries use SDPA's `enable_gqa` broadcast.
    """
    key, value, causal = _causal_when_unmasked(module, query, key, value, attention_mask, is_causal)
    groups = module.num_key_value_groups
    batch, heads, q_len, dim = query.shape
    packed = groups > 1 and q_len == 1
    if packed:
        query = query.reshape(batch, heads // groups, groups, dim)
        if attention_mask is not None and attention_mask.shape[1] != 1:
            attention_mask = attention_mask.reshape(batch, heads // groups, groups, -1)
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=causal,
        enable_gqa=groups > 1 and not packed,
    )
    return out.reshape(batch, heads, q_len, dim).transpose(1, 2), None


def eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """Attention written out: the path that returns the attention probabilities ([B, H, T, S])."""
    key, value, causal = _causal_when_unmasked(module, query, key, value, attention_mask, is_causal)
    groups = module.num_key_value_groups
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if causal:
        attention_mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2), probs


class PalmAttention(nn.Module):
    """Causal self-attention over q, k, v that PalmBlock projected and rotated; it owns no weights.

    Keys and values keep their `num_key_value_heads` heads (1 for multi-query attention) in the cache
    and in attention; `num_key_value_groups` tells the attention kernels how many query heads share one.
    """

    def __init__(self, config: PalmConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = config.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

    def forward(
        self, query, key, value, attention_mask, cache=None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if (
            cache is not None
        ):  # kwargs as Transformers passes them: continuous batching's paged cache reads and writes them
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        implementation = "eager" if kwargs.get("output_attentions") else self.config._attn_implementation
        if implementation == "sdpa":
            attend = sdpa_attention
        else:
            attend = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention)
        out, weights = attend(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return out.reshape(*out.shape[:2], -1), weights


class PalmBlock(GradientCheckpointingLayer):
    """y = x + Attn(LN(x)) + MLP(LN(x)), with q, k, v, gate and up from one matmul (the paper's ~15%)."""

    def __init__(self, config: PalmConfig, layer_idx: int):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.split = (
            self.n_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
            f,
            f,
        )
        self.ln = nn.LayerNorm(d, eps=config.layer_norm_eps, bias=False)
        self.in_proj = nn.Linear(d, sum(self.split), bias=False)
        self.attn = PalmAttention(config, layer_idx)
        self.attn_out = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.mlp_out = nn.Linear(f, d, bias=False)
        self.dropout = config.dropout

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        x = hidden_states
        B, T, _ = x.shape
        q, k, v, gate, up = self.in_proj(self.ln(x)).split(self.split, dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = (t.to(q.dtype) for t in position_embeddings)
        y, _ = self.attn(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, attention_mask, cache=cache, **kwargs)
        # One dropout on the sum of the two parallel branches (both are residual updates); a no-op at p=0 or in eval.
        return x + F.dropout(self.attn_out(y) + self.mlp_out(F.silu(gate) * up), self.dropout, self.training)


@dataclass
class PalmCausalLMOutput(CausalLMOutputWithPast):
    """`loss` is the training objective lm_loss + z_loss_coef * z_loss; both parts are reported too."""

    lm_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None


class PalmPreTrainedModel(PreTrainedModel):
    config_class = PalmConfig
    base_model_prefix = "model"
    _no_split_modules = ["PalmBlock"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": PalmBlock, "attentions": PalmAttention}

    @torch.no_grad()
    def _init_weights(self, module):
        # Paper section 5: kernels ~ N(0, 1/fan_in); embeddings ~ N(0, 1) because no LayerNorm follows
        # them (the tied head is tamed by the 1/sqrt(d) logit scale instead); LayerNorm scales = 1.
        if isinstance(module, nn.Embedding) or module is getattr(self, "lm_head", None):
            init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=module.in_features**-0.5)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)


class PalmModel(PalmPreTrainedModel):
    def __init__(self, config: PalmConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PalmBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=False)
        self.post_init()

    @renamed_cache_kwarg
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and cache is None and not self.training:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(x.shape[1], device=x.device) + past)[None]
        mask = create_causal_mask(
            config=self.config, inputs_embeds=x, attention_mask=attention_mask, cache=cache, position_ids=position_ids
        )
        position_embeddings = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        for layer in self.layers:
            x = layer(x, attention_mask=mask, position_embeddings=position_embeddings, cache=cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), cache=cache if use_cache else None)


class PalmForCausalLM(PalmPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PalmConfig):
        super().__init__(config)
        self.model = PalmModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @renamed_cache_kwarg
    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool = False,
        shift_labels=None,
        num_items_in_batch=None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> PalmCausalLMOutput:
        """`shift_labels` (Transformers' name) are targets already aligned with the positions.

        `skip_logits=True` with labels returns no logits and takes the loss from `fused_lm_loss`, which
        never holds the [tokens, vocab] logits: the training path.
        """
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep else h
        else:
            h = h[:, logits_to_keep]
        targets = shift_labels
        if targets is None and labels is not None:
            # Transformers convention: labels are the input ids; position t predicts label t+1.
            targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
        # Shared input/output embeddings: scale pre-softmax logits by 1/sqrt(d) (paper section 5), or an
        # imported model's own logit scale, applied to h, which is d/V times cheaper than scaling the logits.
        h = h * self.config.head_scale
        logits = loss = ce = z = None
        if skip_logits and targets is not None:
            loss, ce, z = fused_lm_loss(
                h, self.lm_head.weight, targets.to(h.device), self.config.z_loss_coef, num_items_in_batch
            )
        else:
            logits = self.lm_head(h).float()
            if targets is not None:
                ce, z = lm_loss(logits, targets.to(logits.device), num_items_in_batch)
                loss = ce + self.config.z_loss_coef * z if self.config.z_loss_coef else ce
        return PalmCausalLMOutput(
            loss=loss,
            logits=logits,
            lm_loss=ce,  # type: ignore[arg-type]
            z_loss=z,  # type: ignore[arg-type]
            cache=out.cache,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
