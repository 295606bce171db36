import pytest
import torch

from palm import ConfigError, PalmConfig, PalmForCausalLM


def count_params(config: PalmConfig, matrices_only: bool = False) -> int:
    with torch.device("meta"):
        params = list(PalmForCausalLM(config).parameters())
    return sum(p.numel() for p in params if p.ndim >= 2 or not matrices_only)


@pytest.mark.parametrize("name, billions", [("palm-8b", "8.63"), ("palm-62b", "62.50"), ("palm-540b", "540.35")])
def test_table1_parameter_counts(name, billions):
    # Table 1 counts the weight matrices (tied embedding, fused projections, output projections).
    # The LayerNorm scales add (L + 1) * d more: 2.19M for 540B, which would print as 540.36.
    config = PalmConfig.from_preset(name)
    assert f"{count_params(config, matrices_only=True) / 1e9:.2f}" == billions
    norms = count_params(config) - count_params(config, matrices_only=True)
    assert norms == (config.num_hidden_layers + 1) * config.hidden_size


def test_table1_shapes():
    c = PalmConfig.from_preset("palm-540b")
    assert (c.num_hidden_layers, c.num_attention_heads, c.hidden_size, c.head_dim) == (118, 48, 18432, 256)
    assert c.intermediate_size == 4 * c.hidden_size and c.vocab_size == 256000 and c.num_key_value_heads == 1
    with torch.device("meta"):
        block = PalmForCausalLM(PalmConfig.from_preset("palm-540b", num_hidden_layers=1)).model.layers[0]
    # 48 heads x 256 = 12288 != d_model 18432: the attention width is independent of the model width
    assert tuple(block.attn_out.weight.shape) == (18432, 12288)
    assert block.in_proj.weight.shape[0] == 12288 + 2 * 256 + 2 * 73728


@pytest.mark.parametrize("name, low, high", [("tiny", 5e6, 10e6), ("small", 30e6, 60e6), ("base", 120e6, 200e6)])
def test_small_presets_fit_their_size(name, low, high):
    assert low <= count_params(PalmConfig.from_preset(name)) <= high


def test_overrides_and_defaults():
    c = PalmConfig.from_preset("tiny", vocab_size=1000, num_key_value_heads=2)
    assert c.vocab_size == 1000 and c.num_key_value_heads == 2 and c.intermediate_size == 4 * c.hidden_size


@pytest.mark.parametrize("bad", [dict(num_key_value_heads=3), dict(head_dim=7), dict(num_hidden_layers=0)])
def test_invalid_shapes_raise(bad):
    with pytest.raises(ConfigError):
        PalmConfig.from_preset("tiny", **bad)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        PalmConfig.from_preset("palm-1t")


def test_config_round_trip(tmp_path):
    c = PalmConfig.from_preset("small", z_loss_coef=0.0)
    c.save_pretrained(tmp_path)
    d = PalmConfig.from_pretrained(tmp_path)
    assert d.to_dict() == c.to_dict()
