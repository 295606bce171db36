"""Conversations as text and tokens: rendered by the chat template palm saves with its tokenizers
(palm.text.templates), tokenized with their special tokens, and masked so that training scores exactly
the assistant turns and the `</s>` that closes each. The mask is Transformers'
(`apply_chat_template(..., return_assistant_tokens_mask=True)`, read off the template's `{% generation %}`
blocks), so palm's chat fine-tuning and TRL's `assistant_only_loss` score the same tokens.

Message contents may not hold the special tokens' text (`<s>`, `</s>`, ...): rendered into the
template they would become real special tokens, letting a user's text end the assistant's turn.
"""

from __future__ import annotations

from typing import Any

from ..core.errors import PalmError
from .templates import CHAT_ROLES, has_generation_markers
from .tokenizer import SPECIAL_TOKENS, PalmTokenizer


class ChatError(PalmError):
    """A conversation that cannot be rendered: a bad role, content or shape."""


class ChatTemplateError(ChatError):
    """A chat template that cannot say which tokens of a conversation are the assistant's."""


def check_messages(messages: Any, need_assistant: bool = False) -> list[dict[str, str]]:
    """The messages as {"role", "content"} dicts, or a ChatError saying what is wrong with them."""
    if not isinstance(messages, list) or not messages:
        raise ChatError('\'messages\' must be a non-empty list of {"role", "content"} objects')
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatError(f"message {i} is not an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ChatError(f"message {i} has role {role!r}; a palm chat has roles {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise ChatError(f"message {i}: 'content' must be a string, not {type(content).__name__}")
        special = next((t for t in SPECIAL_TOKENS if t in content), None)
        if special:
            raise ChatError(f"message {i}: 'content' holds the special token text {special!r}")
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise ChatError("the conversation has no assistant turn to learn from")
    return out


def _check_specials(tokenizer: PalmTokenizer, messages: list[dict[str, str]]) -> None:
    """No content holds the text of one of this tokenizer's special tokens (an imported model's own, such
    as Command-R's `<|END_OF_TURN_TOKEN|>`, beside palm's that check_messages refuses)."""
    for i, message in enumerate(messages):
        special = next((t for t in tokenizer.special_texts if t in message["content"]), None)
        if special:
            raise ChatError(f"message {i}: 'content' holds the special token text {special!r}")


def render(tokenizer: PalmTokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    if not tokenizer.hf.chat_template:  # an imported model's tokenizer may have none
        raise ChatError("this model's tokenizer has no chat template, so it cannot be prompted with a conversation")
    return str(tokenizer.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt))


def encode_prompt(tokenizer: PalmTokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The ids that ask the model for the next assistant turn (BOS first, as the template writes it)."""
    _check_specials(tokenizer, messages)
    return tokenizer.encode_markup(render(tokenizer, messages, add_generation_prompt=True))[0]


def encode_conversation(tokenizer: PalmTokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """(ids, scored): the conversation's tokens, and which of them training scores: every token that carries a
    character of a `{% generation %}` block (in palm's template, an assistant turn from the space after
    `Assistant:` to its closing `</s>`)."""
    _check_specials(tokenizer, messages)
    template = tokenizer.hf.chat_template
    if isinstance(template, dict):  # named variants: Transformers renders the default one
        template = template.get("default")
    if template and not has_generation_markers(template):
        raise ChatTemplateError(
            "this model's chat template does not mark its assistant turns, so chat fine-tuning cannot tell which "
            "tokens to train on: wrap each assistant turn and its end-of-turn token in {% generation %} ... "
            "{% endgeneration %} in the tokenizer's chat template"
        )
    text = render(tokenizer, messages)
    for i, message in enumerate(messages):
        # The prompt palm generates a turn from must be where training saw that turn begin (Transformers renders
        # no prompt for an empty conversation, so a conversation that opens with the assistant is not checked).
        if i and message["role"] == "assistant":
            if not text.startswith(render(tokenizer, messages[:i], add_generation_prompt=True)):
                raise ChatError("the chat template does not render a conversation as its turns in order")
    out: Any = tokenizer.chat_hf.apply_chat_template(  # a BatchEncoding, with return_dict
        messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
