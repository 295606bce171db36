"""Transformers' own common model and config tests (ModelTesterMixin, ConfigTester), run on palm.

They come from the sdist of the installed Transformers, which `make setup` (its `hf-tests` target)
extracts into the venv: nothing of them is copied here. Every test either passes or is skipped by
Transformers' own rules (hardware it needs, slow markers); palm adds no skip or xfail of its own.

The sdist's tests/*.py import three modules that it does not ship; `_import_common_tests` stands in
for them with the names below, which are palm's, not Transformers' code.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import unittest
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

from palm import PalmConfig, PalmForCausalLM, PalmModel

HF_TESTS = Path(sys.prefix) / "transformers-tests" / transformers.__version__
PACKAGE = "transformers_common_tests"


class GenerationTesterMixin:
    """Stands in for tests/generation/test_utils.py, which Transformers' sdist does not ship.

    test_modeling_common imports it, and checks that a model that can generate is tested with it;
    palm's own tests cover generation.
    """


class ExportTesterMixin:
    """Stands in for tests/exporters/test_export.py, which Transformers' sdist does not ship.

    ModelTesterMixin derives from it; palm's own tests cover torch.export.
    """


# Stands in for tests/utils/test_configuration_utils.py (not in the sdist either): a non-default value
# for some of PreTrainedConfig's own fields, which ConfigTester checks every config accepts and keeps.
CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["PalmForCausalLM"],
    "problem_type": "regression",
    "id2label": {0: "LABEL_A", 1: "LABEL_B"},
    "label2id": {"LABEL_A": 0, "LABEL_B": 1},
}


def _import_common_tests() -> tuple[types.ModuleType, types.ModuleType]:
    """(test_modeling_common, test_configuration_common) from HF_TESTS, imported as one package."""
    if not (HF_TESTS / "__init__.py").is_file():  # `make setup` writes it last
        pytest.fail(
            f"Transformers {transformers.__version__}'s common tests are not at {HF_TESTS}; "
            "`make setup` fetches them (its hf-tests target)",
            pytrace=False,
        )
    spec = importlib.util.spec_from_file_location(
        PACKAGE, HF_TESTS / "__init__.py", submodule_search_locations=[str(HF_TESTS)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    spec.loader.exec_module(package)
    stand_ins = {
        "generation.test_utils": {"GenerationTesterMixin": GenerationTesterMixin},
        "exporters.test_export": {"ExportTesterMixin": ExportTesterMixin},
        "utils.test_configuration_utils": {"config_common_kwargs": CONFIG_COMMON_KWARGS},
    }
    for name, names in stand_ins.items():
        folder = types.ModuleType(f"{PACKAGE}.{name.split('.')[0]}")
        folder.__path__ = []
        module = types.ModuleType(f"{PACKAGE}.{name}")
        module.__dict__.update(names)
        sys.modules[folder.__name__], sys.modules[module.__name__] = folder, module
    return (
        importlib.import_module(f"{PACKAGE}.test_modeling_common"),
        importlib.import_module(f"{PACKAGE}.test_configuration_common"),
    )


modeling_common, configuration_common = _import_common_tests()
ModelTesterMixin = modeling_common.ModelTesterMixin
ConfigTester = configuration_common.ConfigTester
ids_tensor = modeling_common.ids_tensor
torch_device = modeling_common.torch_device


class PalmModelTester:
    """Tiny palm shapes and random inputs, as Transformers' own model testers make them."""

    def __init__(
        self,
        parent: unittest.TestCase,
        batch_size: int = 13,
        seq_length: int = 7,
        is_training: bool = True,
        use_input_mask: bool = True,
        use_labels: bool = True,
        vocab_size: int = 99,
        hidden_size: int = 32,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 1,
        head_dim: int = 8,
        intermediate_size: int = 37,
        max_position_embeddings: int = 512,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
    ):
        self.parent = parent
        self.batch_size, self.seq_length = batch_size, seq_length
        self.is_training, self.use_input_mask, self.use_labels = is_training, use_input_mask, use_labels
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.head_dim = num_key_value_heads, head_dim
        self.max_position_embeddings = max_position_embeddings
        self.pad_token_id, self.bos_token_id, self.eos_token_id = pad_token_id, bos_token_id, eos_token_id

    def get_config(self) -> PalmConfig:
        return PalmConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        # Right padding of varying length: row i keeps its first i + 1 tokens.
        input_mask = torch.tril(torch.ones_like(input_ids)) if self.use_input_mask else None
        labels = ids_tensor([self.batch_size, self.seq_length], self.vocab_size) if self.use_labels else None
        return self.get_config(), input_ids, input_mask, labels

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask, _ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}

    def create_and_check_model(self, config, input_ids, input_mask, labels):
        model = PalmModel(config).to(torch_device).eval()
        model(input_ids, attention_mask=input_mask)
        result = model(input_ids)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))

    def create_and_check_for_causal_lm(self, config, input_ids, input_mask, labels):
        model = PalmForCausalLM(config).to(torch_device).eval()
        result = model(input_ids, attention_mask=input_mask, labels=labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.seq_length, self.vocab_size))
        self.parent.assertEqual(result.loss.shape, ())


class PalmModelTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (PalmModel, PalmForCausalLM)
    # That test exempts models added before 2023, dated by a "# Copyright YYYY" line atop the config's
    # file, which palm's config.py does not carry; palm is not one of those models.
    test_can_init_all_missing_weights_before_2023 = True

    @classmethod
    def setUpClass(cls):
        # The common tests tell a base model from a causal-LM head (which gets labels, a loss, the training
        # and RoPE tests) by its name in these tables, which list the models in Transformers' tree;
        # `AutoModel.register` does not add to them. palm is listed while this class runs, as one of those.
        for table, name in ((MODEL_MAPPING_NAMES, "PalmModel"), (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "PalmForCausalLM")):
            listing = patch.dict(table, {PalmConfig.model_type: name})
            listing.start()
            cls.addClassCleanup(listing.stop)

    def setUp(self):
        self.model_tester = PalmModelTester(self)
        # hidden_size 48 (not the default 256) checks that the given value survives every round trip.
        self.config_tester = ConfigTester(self, config_class=PalmConfig, hidden_size=48)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_for_causal_lm(self):
        self.model_tester.create_and_check_for_causal_lm(*self.model_tester.prepare_config_and_inputs())
