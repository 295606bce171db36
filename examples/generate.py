"""The Transformers way to use a palm model, as in the original request:

python examples/generate.py MODEL_DIR "我喜欢编程，因为"
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import palm  # noqa: F401  registers the palm model type with the Auto classes

model_dir, prompt = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "我喜欢编程，因为"
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)

inputs = tokenizer(prompt, return_tensors="pt")
torch.manual_seed(0)
output = model.generate(**inputs, max_new_tokens=40, do_sample=True, temperature=0.8, top_k=50)
print(tokenizer.decode(output[0], skip_special_tokens=True))
