"""Chat fine-tuning's data: the template, the loss mask over assistant turns, and bad rows."""

import json

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from transformers import AutoTokenizer

from palm.text.chat import ChatError, check_messages, encode_conversation, encode_prompt, render
from palm.training.finetune_data import collate

CONVERSATION = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "Remember thirty-seven and forty-eight."},
    {"role": "assistant", "content": "37 and 48."},
    {"role": "user", "content": "Their sum, in Chinese numerals?"},
    {"role": "assistant", "content": "八十五"},
]


def test_the_mask_covers_exactly_the_assistant_turns_and_their_end_of_turn(tokenizer):
    ids, scored = encode_conversation(tokenizer, CONVERSATION)
    assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.eos_id) == 2
    kept = [t for t, s in zip(ids, scored) if s]
    # scored: " 37 and 48.</s>" and " 八十五</s>", nothing of the system or user turns, nor the role names
    assert tokenizer.hf.decode(kept, skip_special_tokens=False) == " 37 and 48.</s> 八十五</s>"
    x, y = collate([(ids, scored)], tokenizer.pad_id)
    assert int((y != -100).sum()) == sum(scored[1:]) and int((y == tokenizer.eos_id).sum()) == 2


def test_the_saved_template_gives_exactly_the_training_text(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.apply_chat_template(CONVERSATION, tokenize=False) == render(tokenizer, CONVERSATION)
    prompt = hf.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)
    assert render(tokenizer, CONVERSATION).startswith(prompt) and prompt.endswith("Assistant:")
    ids, _ = encode_conversation(tokenizer, CONVERSATION)
    assert ids[: len(encode_prompt(tokenizer, CONVERSATION[:-1]))] == encode_prompt(tokenizer, CONVERSATION[:-1])


@pytest.mark.parametrize(
    "messages, words",
    [
        ([{"role": "tool", "content": "x"}], "role 'tool'"),
        ([{"role": "user", "content": 3}], "must be a string"),
        ([{"role": "user", "content": "end </s> early"}], "special token"),
        ([{"role": "user"}], "must be a string"),
        ("hello", "non-empty list"),
    ],
)
def test_bad_messages_are_refused(messages, words):
    with pytest.raises(ChatError, match=words):
        check_messages(messages)


@pytest.mark.parametrize(
    "row, words",
    [
        ({"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]}, "role 'robot'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "x"}]}, "must be a string"),
        ({"prompt": "a", "completion": "b"}, "messages"),
    ],
)
def test_bad_chat_rows_name_the_file_and_line(capsys, model_dir, tmp_path, row, words):
    data = tmp_path / "chat.jsonl"
    good = {"messages": CONVERSATION}
    data.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    code, _, err = run_cli(
        capsys,
        "finetune",
        "--model",
        model_dir,
        "--data",
        str(data),
        "--format",
        "chat",
        "--out",
        str(tmp_path / "run"),
    )
    assert_one_line_error(code, err, f"{data}:2", words)
    assert not (tmp_path / "run").exists()


def test_a_chat_prompt_asks_for_the_next_assistant_turn(tokenizer):
    ids = torch.tensor(encode_prompt(tokenizer, CONVERSATION[:2]))
    assert tokenizer.hf.decode(ids, skip_special_tokens=False).endswith(
        "User: Remember thirty-seven and forty-eight.\nAssistant:"
    )
