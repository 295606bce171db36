"""Prompt templates for fine-tuning tasks: the text a prompt is wrapped in, at training and at inference.

The prompt goes where {prompt} is; the completion follows the template directly.
"""

from __future__ import annotations

TEMPLATES = {
    "summarize": "Summarize the text.\n\n{prompt}\n\nSummary: ",
    "qa": "Question: {prompt}\nAnswer: ",
    "translate": "Translate: {prompt}\nTranslation: ",
}


def format_prompt(prompt: str, task: str | None) -> str:
    return TEMPLATES[task].format(prompt=prompt) if task else prompt
