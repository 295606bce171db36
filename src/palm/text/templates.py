"""Prompt templates: the text a fine-tuning task wraps its prompt in, and the chat template.

The chat template is saved with every palm tokenizer (Transformers' `chat_template`), so that
`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` gives exactly the text palm's
chat fine-tuning trained on, and `palm serve` and `palm generate --chat` prompt the same way:

    <s>System: {system}\\n
    User: {user}\\n
    Assistant: {assistant}</s>\\n          (every assistant turn is closed by </s>, the end-of-turn token)
    ...
    Assistant:                           (the generation prompt: the reply starts with its space)
"""

from __future__ import annotations

TEMPLATES = {
    "summarize": "Summarize the text.\n\n{prompt}\n\nSummary: ",
    "qa": "Question: {prompt}\nAnswer: ",
    "translate": "Translate: {prompt}\nTranslation: ",
}

CHAT_ROLES = ("system", "user", "assistant")
ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}

CHAT_TEMPLATE = (
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


def format_prompt(prompt: str, task: str | None) -> str:
    return TEMPLATES[task].format(prompt=prompt) if task else prompt


def reply_text(generated: str) -> str:
    """An assistant reply as a user reads it: without the space the template puts after `Assistant:`."""
    return generated[1:] if generated.startswith(" ") else generated
