import pytest
from test_config import count_params

from palm import PalmConfig
from palm.training.flops import flops_per_token, matrix_params, mfu


@pytest.mark.parametrize("name", ["tiny", "palm-8b", "palm-540b"])
def test_matrix_params_match_the_built_model(name):
    config = PalmConfig.from_preset(name)
    assert matrix_params(config) == count_params(config, matrices_only=True)


@pytest.mark.parametrize("name, tflops", [("palm-8b", "0.0550"), ("palm-62b", "0.388"), ("palm-540b", "3.28")])
def test_flops_per_token_match_table_21(name, tflops):
    digits = len(tflops.split(".")[1])
    assert f"{flops_per_token(PalmConfig.from_preset(name), 2048) / 1e12:.{digits}f}" == tflops


def test_appendix_b_mfu_example():
    # 238.3K tokens/s x 6 x 540B / (275 TFLOP/s x 6144 chips), the paper's attention-free example
    assert round(mfu(238.3e3, 6 * 540e9, 275e12 * 6144), 3) == 0.457
    assert mfu(1.0, 1.0, None) is None
