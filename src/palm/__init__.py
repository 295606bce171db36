"""palm: PaLM (Chowdhery et al. 2022) end to end, as first-class Transformers models.

Importing palm registers the model with Transformers' Auto classes, so `AutoConfig`,
`AutoModelForCausalLM`, `AutoTokenizer` and `pipeline` load a palm directory with no extra flags.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .core.errors import CheckpointError, ConfigError, CorpusError, PalmError, TokenizerError
from .model.config import PRESETS, PalmConfig
from .model.model import PalmForCausalLM, PalmModel
from .text.tokenizer import PalmTokenizer, train_tokenizer

AutoConfig.register(PalmConfig.model_type, PalmConfig, exist_ok=True)
AutoModel.register(PalmConfig, PalmModel, exist_ok=True)
AutoModelForCausalLM.register(PalmConfig, PalmForCausalLM, exist_ok=True)
# Saved directories also carry the modelling code and an `auto_map`, for environments without palm.
PalmConfig.register_for_auto_class()
PalmForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"
__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "CorpusError",
    "PalmConfig",
    "PalmError",
    "PalmForCausalLM",
    "PalmModel",
    "PalmTokenizer",
    "TokenizerError",
    "train_tokenizer",
]
