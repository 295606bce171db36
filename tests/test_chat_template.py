"""The chat template's `{% generation %}` markers: Transformers' assistant mask is the one palm's chat fine-tuning
always scored, the text is what the template wrote before them, and tokenizers saved before keep working."""

import json
import random
import shutil
from pathlib import Path

import jinja2
import pytest
from conftest import assert_one_line_error, run_cli
from test_chat import CONVERSATION
from transformers import AutoTokenizer

from palm.text.chat import ChatTemplateError, encode_conversation, render
from palm.text.templates import CHAT_ROLES, CHAT_TEMPLATE, OLD_CHAT_TEMPLATE
from palm.text.tokenizer import PalmTokenizer

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "model-0.1.0"

# Pieces of message content: digits (each its own token), unicode beyond the trained alphabet (byte fallback),
# combining marks, whitespace runs at either end, and text that looks like the template's own.
PIECES = [
    "",
    " ",
    "  ",
    "\n",
    "\t",
    "\r\n",
    "0",
    "42",
    "3.14",
    "hello",
    " world",
    "Hello,",
    "?!",
    ":",
    "Assistant:",
    "User: x",
    "八十五",
    "我喜欢编程",
    "e\u0301",
    "✨",
    "🙂",
    "Ω",
    "ß",
    "<s",
    "</",
    "s/>",
    "<0x41>",
    "\u00a0",
    "日本語",
]


def random_conversation(rng: random.Random) -> list[dict[str, str]]:
    messages = []
    for _ in range(rng.randint(1, 7)):
        content = "".join(rng.choice(PIECES) for _ in range(rng.choice([0, 1, 1, 2, 3, 6])))
        messages.append({"role": rng.choice(CHAT_ROLES), "content": content})
    return messages


CONVERSATIONS = [random_conversation(random.Random(seed)) for seed in range(100)]
OLD = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(OLD_CHAT_TEMPLATE)


def palm_before(tokenizer: PalmTokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """palm's chat ids and mask as it computed them by hand before the markers, from the template it saved then:
    each assistant turn scored from just after the prompt that asks for it ("...Assistant:", so its space is
    scored) to its `</s>` (the newline after it is not)."""

    def old(msgs, prompt=False):  # Jinja itself: Transformers refuses an empty conversation's prompt
        return OLD.render(messages=msgs, add_generation_prompt=prompt, bos_token="<s>", eos_token="</s>")

    text = old(messages)
    spans = [
        (len(old(messages[:i], prompt=True)), len(old(messages[: i + 1])) - 1)
        for i, m in enumerate(messages)
        if m["role"] == "assistant"
    ]
    ids, offsets = tokenizer.encode_markup(text)
    return ids, [any(a < e and b > s for s, e in spans) for a, b in offsets]


def test_transformers_assistant_mask_is_palms_on_random_conversations(tokenizer, tokenizer_dir):
    # palm's saved tokenizer reads "<s>" in text as characters; the template writes <s> and </s> as text, so a
    # caller that tokenizes what it renders (TRL does) loads the tokenizer reading special tokens' text as them.
    hf = AutoTokenizer.from_pretrained(tokenizer_dir, split_special_tokens=False)
    assert hf.chat_template == CHAT_TEMPLATE
    scored_turns = 0
    for messages in CONVERSATIONS:
        want_ids, want_mask = palm_before(tokenizer, messages)
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert out["input_ids"] == want_ids, messages
        assert [bool(m) for m in out["assistant_masks"]] == want_mask, messages
        assert encode_conversation(tokenizer, messages) == (want_ids, want_mask), messages
        scored_turns += any(want_mask)
    assert 60 < scored_turns < 100  # most have an assistant turn, some have none


def test_the_markers_change_no_text_and_keep_every_prefix(tokenizer):
    for messages in CONVERSATIONS:
        text = render(tokenizer, messages)
        assert text == OLD.render(messages=messages, bos_token="<s>", eos_token="</s>")
        for i in range(1, len(messages) + 1):
            prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
            assert prompt == OLD.render(
                messages=messages[:i], add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
            )
            assert text.startswith(render(tokenizer, messages[:i]))
            if i < len(messages) and messages[i]["role"] == "assistant":
                assert text.startswith(prompt)


def test_a_tokenizer_saved_with_the_old_template_gets_the_markers(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(OLD_CHAT_TEMPLATE)
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == OLD_CHAT_TEMPLATE
    assert PalmTokenizer.load(tmp_path).hf.chat_template == CHAT_TEMPLATE
    assert PalmTokenizer.load(FIXTURE).hf.chat_template == CHAT_TEMPLATE  # saved by palm 0.1.0


def test_special_token_text_stays_text_whatever_flag_the_tokenizer_was_saved_with(tokenizer_dir, tmp_path):
    AutoTokenizer.from_pretrained(tokenizer_dir, split_special_tokens=False).save_pretrained(tmp_path)  # as TRL saves
    tok = PalmTokenizer.load(tmp_path)
    tok.hf("<s>")  # Transformers leaves its reading on the backend palm's encode shares
    assert tok.bos_id not in tok.encode("<s>", bos=False)
    assert tok.chat_hf("<s>", add_special_tokens=False)["input_ids"] == [tok.bos_id]
    tok.save(tmp_path / "again")
    assert AutoTokenizer.from_pretrained(tmp_path / "again")("<s>", add_special_tokens=False)["input_ids"] != [
        tok.bos_id
    ]


def chat_finetune(capsys, model: Path, tmp_path: Path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": CONVERSATION}, ensure_ascii=False) + "\n" for _ in range(4)))
    argv = ["--data", str(data), "--format", "chat", "--out", str(tmp_path / "run"), "--seq-len", "64"]
    return run_cli(capsys, "finetune", "--model", str(model), *argv, "--steps", "1", "--batch-size", "2")


def test_a_model_saved_before_the_markers_chat_finetunes(capsys, tmp_path):
    code, stdout, err = chat_finetune(capsys, shutil.copytree(FIXTURE, tmp_path / "old"), tmp_path)
    assert code == 0 and "fine-tuned 1 steps" in stdout, err
    assert (tmp_path / "run" / "final" / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_a_template_without_markers_is_one_line(capsys, model_dir, tmp_path):
    model = shutil.copytree(model_dir, tmp_path / "model")
    (model / "chat_template.jinja").write_text(OLD_CHAT_TEMPLATE.replace("Assistant:", "Bot:"))
    code, _, err = chat_finetune(capsys, model, tmp_path)
    assert_one_line_error(code, err, "{% generation %}")
    with pytest.raises(ChatTemplateError):
        encode_conversation(PalmTokenizer.load(model), CONVERSATION)
