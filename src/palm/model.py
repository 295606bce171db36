"""The PaLM network (Chowdhery et al. 2022, section 2), top to bottom.

    x -> Embedding (N(0,1), no LayerNorm) -> L x ParallelBlock -> LayerNorm -> tied head / sqrt(d) -> logits
    ParallelBlock: y = x + Attn(LN(x)) + SwiGLU(LN(x)), one LN, one fused input matmul, no biases

This file is copied next to every saved checkpoint (Transformers' `auto_map`), so it imports only
torch, transformers and `.config`, and loads with `trust_remote_code=True` where palm is not installed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .config import PalmConfig

# Transformers 5.24 renamed the KV-cache argument and output field `past_key_values` -> `cache`.
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
IGNORE_INDEX = -100


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, 1, T, head_dim] in fp32 for absolute positions [B, T].

    Computed from the config on every call rather than kept in a buffer: Transformers 5 refills
    non-persistent buffers with garbage after a meta-device load, and `.to(bf16)` would round them.
    """
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


@dataclass
class AttentionMask:
    """Decides, once per forward pass, how attention is masked; every layer shares the answer.

    `padding` is the 2D [B, past + T] mask generate() sends (1 = real token), or None. Queries sit at
    cache slots past..past+T-1. Without padding a prefill is plain `is_causal` and a one-token decode
    step needs no mask at all, which keeps SDPA on its fused kernels.
    """

    padding: torch.Tensor | None
    past: int
    q_len: int
    device: torch.device
    _built: dict = dataclasses.field(default_factory=dict)

    def __call__(self, kv_len: int) -> tuple[torch.Tensor | None, bool]:
        if self.padding is None and kv_len == self.past + self.q_len:
            if self.past == 0:
                return None, self.q_len > 1
            if self.q_len == 1:
                return None, False
        if kv_len not in self._built:
            self._built[kv_len] = self._build(kv_len)
        return self._built[kv_len], False

    def _build(self, kv_len: int) -> torch.Tensor:
        q_slot = torch.arange(self.past, self.past + self.q_len, device=self.device)
        k_slot = torch.arange(kv_len, device=self.device)
        mask = k_slot[None, :] <= q_slot[:, None]  # causal by slot; also hides unfilled slots of a fixed cache
        mask = mask[None, None]
        if self.padding is not None:
            keys = self.padding.bool()
            if keys.shape[-1] < kv_len:
                keys = F.pad(keys, (0, kv_len - keys.shape[-1]), value=False)
            mask = mask & keys[:, None, None, :kv_len]
            # A padding query would see no key at all and SDPA would return NaN; let it see itself.
            mask = mask | (k_slot[None, :] == q_slot[:, None])[None, None]
        return mask


class PalmBlock(GradientCheckpointingLayer):
    """y = x + Attn(LN(x)) + MLP(LN(x)), with q, k, v, gate and up from one matmul (the paper's ~15%)."""

    def __init__(self, config: PalmConfig, layer_idx: int):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.split = (self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim, f, f)
        self.ln = nn.LayerNorm(d, eps=config.layer_norm_eps, bias=False)
        self.in_proj = nn.Linear(d, sum(self.split), bias=False)
        self.attn_out = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.mlp_out = nn.Linear(f, d, bias=False)
        self.dropout, self.attention_dropout = config.dropout, config.attention_dropout

    def forward(self, x, cos, sin, mask: AttentionMask, cache=None):
        B, T, _ = x.shape
        q, k, v, gate, up = self.in_proj(self.ln(x)).split(self.split, dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # the cache keeps n_kv_heads (1 for MQA) heads, not n_heads
        attn_mask, is_causal = mask(k.shape[-2])
        # enable_gqa lets SDPA broadcast the shared K/V head instead of copying it n_heads times.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=self.n_kv_heads != self.n_heads,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        # One dropout on the sum of the two parallel branches (both are residual updates); a no-op at p=0 or in eval.
        return x + F.dropout(self.attn_out(y) + self.mlp_out(F.silu(gate) * up), self.dropout, self.training)


def lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_items: int | torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, mean log(Z)^2) over targets != -100, in fp32; targets are already aligned with logits.

    One log-softmax serves both terms (log Z = logit[target] - logp[target]), as T5X shares one
    logsumexp; log_softmax's fused kernel is several times faster on CPU than logsumexp's backward.
    """
    logits = logits.float().flatten(0, -2)
    targets = targets.flatten()
    valid = targets != IGNORE_INDEX
    index = targets.clamp(min=0)[:, None]
    logp_t = F.log_softmax(logits, dim=-1).gather(-1, index).squeeze(-1)
    log_z = logits.gather(-1, index).squeeze(-1) - logp_t
    n = valid.sum().clamp(min=1) if num_items is None else num_items
    ce = -(logp_t * valid).sum() / n
    z = (log_z.square() * valid).sum() / n
    return ce, z


class _FusedHeadLoss(torch.autograd.Function):
    """ce + z_coef * z straight from hidden states and the head weight, a few rows of logits at a time.

    The gradient is taken chunk by chunk in the forward pass (the loss is the end of the graph), so
    the [tokens, vocab] logits, their softmax and their gradient are never whole in memory; backward
    only scales the stored gradients. Same maths as `lm_loss`, same matmul FLOPs.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, z_coef: float, n, chunk: int):
        ce_sum = h.new_zeros((), dtype=torch.float32)
        z_sum = h.new_zeros((), dtype=torch.float32)
        need_grad = any(ctx.needs_input_grad[:2])
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        for i in range(0, h.shape[0], chunk):
            hc, t = h[i : i + chunk], targets[i : i + chunk]
            valid = (t != IGNORE_INDEX).float()
            index = t.clamp(min=0)[:, None]
            logits = (hc @ weight.t()).float()  # bf16 matmul under autocast, maths in fp32
            p = F.log_softmax(logits, dim=-1)
            logp_t = p.gather(-1, index).squeeze(-1)
            log_z = logits.gather(-1, index).squeeze(-1) - logp_t
            ce_sum -= (logp_t * valid).sum()
            z_sum += (log_z.square() * valid).sum()
            if not need_grad:
                continue
            # d/dlogits of (ce + c z) / n = (softmax * (1 + 2 c log Z) - onehot(target)) * valid / n
            p.exp_().mul_(((1 + 2 * z_coef * log_z) * valid / n)[:, None])
            p.scatter_add_(-1, index, -(valid / n)[:, None])
            g = p.to(hc.dtype)
            grad_h[i : i + chunk] = g @ weight
            grad_w += g.t() @ hc
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        ce, z = ce_sum / n, z_sum / n
        ctx.mark_non_differentiable(ce, z)
        return ce + z_coef * z, ce, z

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_z):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None, None


def fused_lm_loss(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    z_coef: float,
    num_items: int | torch.Tensor | None = None,
    chunk_tokens: int = 2**23,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce + z_coef * z, ce, z) of `lm_loss(h @ weight.T, targets)` without materialising the logits.

    `chunk_tokens` bounds the logits held at once (rows x vocab elements, 32 MB in fp32 by default, and
    never under 256 rows): small enough to reuse memory, large enough for efficient matmuls.
    """
    h = h.flatten(0, -2)
    targets = targets.flatten()
    n = (targets != IGNORE_INDEX).sum().clamp(min=1) if num_items is None else num_items
    chunk = max(256, chunk_tokens // weight.shape[0])
    return _FusedHeadLoss.apply(h, weight, targets, float(z_coef), n, chunk)


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

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        cache=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        cache = cache if cache is not None else past_key_values  # 5.24 sends `cache`, 5.23 `past_key_values`
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and cache is None and not self.training:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        B, T = x.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None]
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("attention_mask must be 2D [batch, keys] with 1 for real tokens")
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        mask = AttentionMask(attention_mask, past, T, x.device)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache if use_cache else None)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), **{CACHE_FIELD: cache if use_cache else None})


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

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep: int = 0,
        cache=None,
        skip_logits: bool = False,
        **kwargs,
    ) -> PalmCausalLMOutput:
        """`shift_labels` (kwarg, Transformers' name) gives targets already aligned with the positions.

        `skip_logits=True` with labels returns no logits and takes the loss from `fused_lm_loss`, which
        never holds the [tokens, vocab] logits: the training path.
        """
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        targets = kwargs.get("shift_labels")
        if targets is None and labels is not None:
            # Transformers convention: labels are the input ids; position t predicts label t+1.
            targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
        # Shared input/output embeddings: scale pre-softmax logits by 1/sqrt(d) (paper section 5),
        # applied to h, which is d/V times cheaper than scaling the logits.
        h = h * self.config.hidden_size**-0.5
        logits = loss = ce = z = None
        if skip_logits and targets is not None:
            loss, ce, z = fused_lm_loss(
                h, self.lm_head.weight, targets.to(h.device), self.config.z_loss_coef, kwargs.get("num_items_in_batch")
            )
        else:
            logits = self.lm_head(h).float()
            if targets is not None:
                ce, z = lm_loss(logits, targets.to(logits.device), kwargs.get("num_items_in_batch"))
                loss = ce + self.config.z_loss_coef * z if self.config.z_loss_coef else ce
        return PalmCausalLMOutput(
            loss=loss, logits=logits, lm_loss=ce, z_loss=z, **{CACHE_FIELD: out.get(CACHE_FIELD)}
        )
