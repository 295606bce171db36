"""Prompt templates: the text a fine-tuning task wraps its prompt in, and the chat template.

The chat template is saved with every palm tokenizer (Transformers' `chat_template`), so that
`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` gives exactly the text palm's
chat fine-tuning trained on, and `palm serve` and `palm generate --chat` prompt the same way:

    <s>System: {system}\\n
    User: {user}\\n
    Assistant: {assistant}</s>\\n          (every assistant turn is closed by </s>, the end-of-turn token)
    ...
    Assistant:                           (the generation prompt: the reply starts with its space)

Each assistant turn from its space to its `</s>` sits in `{% generation %}` ... `{% endgeneration %}`, which
render nothing: `apply_chat_template(..., return_assistant_tokens_mask=True)` then marks the tokens palm's
chat fine-tuning scores (palm.text.chat), and TRL's `assistant_only_loss=True` takes the same mask.
"""

from __future__ import annotations

import re

TEMPLATES = {
    "summarize": "Summarize the text.\n\n{prompt}\n\nSummary: ",
    "qa": "Question: {prompt}\nAnswer: ",
    "translate": "Translate: {prompt}\nTranslation: ",
}

CHAT_ROLES = ("system", "user", "assistant")
ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}

# The space after "Assistant:" is the reply's (the generation prompt ends before it, so the model writes
# it) and is scored; the newline after `</s>` belongs to no turn and is not. The newline is written as
# `{{ '\n' }}`: Transformers renders with trim_blocks, which would drop a newline right after `{% endgeneration %}`.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}System: {{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant:"
    "{% generation %} {{ message['content'] }}{{ eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ raise_exception('palm chat has no role ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# What palm saved with its tokenizers before the markers: it renders the same text, so a tokenizer that
# holds it is given CHAT_TEMPLATE when loaded (palm.text.tokenizer).
OLD_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}System: {{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}\n"
    "{% else %}{{ raise_exception('palm chat has no role ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def has_generation_markers(template: str) -> bool:
    """Whether a chat template marks its assistant turns, as `return_assistant_tokens_mask` needs."""
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def format_prompt(prompt: str, task: str | None) -> str:
    return TEMPLATES[task].format(prompt=prompt) if task else prompt


def reply_text(generated: str) -> str:
    """An assistant reply as a user reads it: without the space the template puts after `Assistant:`."""
    return generated[1:] if generated.startswith(" ") else generated
