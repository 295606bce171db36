"""The Transformers user experience, each in a fresh process as a user would have it."""

import json
import os
import subprocess
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "我喜欢编程，因为"


def run_python(code: str, home) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home)}  # a fresh cache for remote code
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_pipeline_after_import_palm(model_dir, tmp_path):
    out = run_python(
        "import json, palm\n"
        "from transformers import pipeline\n"
        f"gen = pipeline('text-generation', model={model_dir!r})\n"
        f"print(json.dumps(gen({PROMPT!r}, max_new_tokens=8, do_sample=False)[0]['generated_text']))\n",
        tmp_path,
    )
    text = json.loads(out)
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)


def test_auto_classes_after_import_palm(model_dir, tmp_path):
    out = run_python(
        "import palm\n"
        "from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer\n"
        f"c = AutoConfig.from_pretrained({model_dir!r}); m = AutoModelForCausalLM.from_pretrained({model_dir!r})\n"
        f"t = AutoTokenizer.from_pretrained({model_dir!r})\n"
        "print(type(c).__name__, type(m).__module__, type(t).__name__)\n",
        tmp_path,
    )
    assert out == "PalmConfig palm.model.model TokenizersBackend"


def test_remote_code_without_palm_generates_the_same_tokens(model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT, return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=16, do_sample=False)[0].tolist()
    out = run_python(
        "import sys, json\n"
        "sys.modules['palm'] = None  # palm cannot be imported in this process\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({model_dir!r}, trust_remote_code=True)\n"
        f"t = AutoTokenizer.from_pretrained({model_dir!r}, trust_remote_code=True)\n"
        "assert 'transformers_modules' in type(m).__module__, type(m).__module__\n"
        "assert m.lm_head.weight is m.model.embed_tokens.weight\n"
        f"ids = t({PROMPT!r}, return_tensors='pt').input_ids\n"
        "print(json.dumps(m.generate(ids, max_new_tokens=16, do_sample=False)[0].tolist()))\n",
        tmp_path,
    )
    assert json.loads(out) == expected
    assert len(set(expected[ids.shape[1] :])) > 3


def test_saved_directory_carries_code_and_auto_map(model_dir):
    from pathlib import Path

    config = json.loads((Path(model_dir) / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "config.PalmConfig", "AutoModelForCausalLM": "model.PalmForCausalLM"}
    assert (Path(model_dir) / "model.py").is_file() and (Path(model_dir) / "config.py").is_file()
