"""FLOP counts and model FLOPs utilisation (PaLM Appendix B), plus the hardware facts they need.

MFU = observed tokens/s x (6N + 12 L H Q T) / peak FLOP/s, where N counts the weight matrices,
L layers, H heads, Q head size and T sequence length. Rematerialisation is not counted.
"""

from __future__ import annotations

import time

import torch

from ..model.config import PalmConfig

# Dense bf16 tensor-core peaks from the vendors' data sheets (SXM parts), by CUDA compute capability;
# a device not listed has no known peak, and MFU against a data sheet is then reported as None.
DATASHEET_BF16_FLOPS: dict[tuple[int, int], float] = {
    (9, 0): 989e12,  # H100 / H200
    (8, 0): 312e12,  # A100
}


def matrix_params(config: PalmConfig) -> int:
    """Parameters in weight matrices (what the paper's Table 1 counts): tied embedding plus blocks."""
    d, f = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    per_block = d * (q + 2 * kv + 2 * f) + q * d + f * d
    head = 0 if config.tie_word_embeddings else config.vocab_size * d
    return config.vocab_size * d + head + config.num_hidden_layers * per_block


def flops_per_token(config: PalmConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls forward and backward plus 12 L H Q T for attention."""
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6 * matrix_params(config) + attention


def mfu(tokens_per_s: float, flops_per_tok: float, peak_flops: float | None) -> float | None:
    return None if not peak_flops else tokens_per_s * flops_per_tok / peak_flops


def measure_matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of square matmuls in `dtype` on `device`, measured now (the machine's practical peak)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up: kernel selection, allocation
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * n**3 * reps / elapsed


def datasheet_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    return DATASHEET_BF16_FLOPS.get(torch.cuda.get_device_capability(device))
