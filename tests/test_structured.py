"""Structured output through the openai client on a random-weights model: json_schema replies parse and
validate for 50 sampled prompts, json_object replies are objects, a required tool call comes back as
`tool_calls` with arguments valid for the tool, constrained and free rows share batches (the free ones
unchanged), and what cannot be compiled is a 400 naming the field."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from conftest import lively_model, tiny_config
from test_serve import running

from palm.inference.generate import Generator, SamplingConfig
from palm.serve import create_app

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["color", "count", "ok", "tag"],
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "tag": {"type": "string", "maxLength": 6},
    },
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "additionalProperties": False,
            "required": ["city", "days"],
            "properties": {
                "city": {"enum": ["Paris", "北京"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "additionalProperties": False,
            "required": ["zone"],
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
        },
    },
}


@pytest.fixture(scope="module")
def served(tokenizer):
    generator = Generator(lively_model(tiny_config(tokenizer)), tokenizer)
    with running(create_app(generator, "m", max_batch=8)) as base:
        yield generator, openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)


def test_json_schema_replies_parse_and_validate(served):
    _, client = served
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}

    def ask(i: int) -> str:
        return (
            client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": f"describe thing {i}"}],
                response_format=fmt,
                max_tokens=96,
                temperature=1.0,
                seed=i,
            )
            .choices[0]
            .message.content
        )

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(50)))
    for reply in replies:
        jsonschema.validate(json.loads(reply), SCHEMA)
    assert len(set(replies)) > 10  # sampled, not one canned answer
    # Any JSON object: strings and objects as long as the model likes, so a random model is nudged (a bias on
    # the closing quote and brace) to close them within the budget.
    tok = served[0].tokenizer
    closing = {str(tok.encode(c, bos=False)[0]): 6.0 for c in ('"', "}")}
    finished = 0
    for seed in range(5):
        reply = client.completions.create(
            model="m",
            prompt="x",
            max_tokens=128,
            temperature=1.0,
            seed=seed,
            logit_bias=closing,
            extra_body={"response_format": {"type": "json_object"}},
        ).choices[0]
        assert reply.text.startswith("{"), reply
        if reply.finish_reason == "stop":  # the grammar ended it: a whole object
            finished += 1
            assert isinstance(json.loads(reply.text), dict), reply
    assert finished >= 3  # sampling differs a little between processors; most replies close within the budget


def test_a_required_tool_call_is_a_valid_call(served):
    _, client = served
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        for seed in range(5):
            reply = client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "weather in Paris?"}],
                tools=[WEATHER, TIME],
                tool_choice=choice,
                max_tokens=64,
                temperature=1.0,
                seed=seed,
            ).choices[0]
            assert reply.finish_reason == "tool_calls" and reply.message.content is None
            call = reply.message.tool_calls[0]
            tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
            jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
            if isinstance(choice, dict):
                assert call.function.name == "get_time"


def test_a_streamed_tool_call_comes_as_one_tool_calls_delta(served):
    """Streamed with tools, a call is held back and sent as one `tool_calls` delta (OpenAI's shape: index, id,
    name, the arguments as JSON), the finish "tool_calls"; the same seed gives the call the whole reply gives."""
    _, client = served
    asked = dict(
        model="m",
        messages=[{"role": "user", "content": "weather?"}],
        tools=[WEATHER, TIME],
        tool_choice="required",
        max_tokens=64,
        temperature=1.0,
        seed=7,
        n=2,
    )
    whole = client.chat.completions.create(**asked)
    calls, finishes, content = {}, {}, ""
    for chunk in client.chat.completions.create(**asked, stream=True):
        for c in chunk.choices:
            content += c.delta.content or ""
            for call in c.delta.tool_calls or []:
                assert call.index == 0 and call.id.startswith("call_") and call.type == "function"
                calls[c.index] = (call.function.name, json.loads(call.function.arguments))
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert content == "" and finishes == {0: "tool_calls", 1: "tool_calls"}
    for c in whole.choices:
        name, arguments = calls[c.index]
        assert (name, arguments) == (
            c.message.tool_calls[0].function.name,
            json.loads(c.message.tool_calls[0].function.arguments),
        )
        jsonschema.validate(arguments, {"get_weather": WEATHER, "get_time": TIME}[name]["function"]["parameters"])


def test_constrained_and_free_rows_batch_together(served):
    generator, client = served
    free_prompts = ["The meaning of life is", "我喜欢编程，因为", "def f(x):"]
    solo = [generator.generate([p], SamplingConfig(max_new_tokens=12))[0].text for p in free_prompts]
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
    calls = [dict(prompt=p, max_tokens=12, temperature=0, extra_body={"repetition_penalty": 1.0}) for p in free_prompts]
    calls += [
        dict(prompt=f"json {i}", max_tokens=96, temperature=0, extra_body={"response_format": fmt}) for i in range(5)
    ]
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda kw: client.completions.create(model="m", **kw).choices[0].text, calls))
    assert texts[:3] == solo
    for text in texts[3:]:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_what_cannot_be_constrained_is_a_400_naming_it(served):
    _, client = served
    messages = [{"role": "user", "content": "hi"}]
    bad = [
        (
            dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
            "response_format",
        ),
        (dict(response_format={"type": "yaml"}), "response_format"),
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tool_choice="required"), "tool_choice"),
        (dict(tools=[{"type": "function"}]), "tools"),
    ]
    for extra, param in bad:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="m", messages=messages, max_tokens=4, **extra)
        assert info.value.body["param"] == param, (extra, info.value.body)


def test_the_batched_mask_is_xgrammars_own_with_control_tokens_out(tokenizer):
    """restrict() fills every row's mask into one packed bitmask and unpacks it with torch: it must equal
    xgrammar's own kernel applied a row at a time, minus the control-character tokens, and leave free rows be."""
    import torch
    import xgrammar

    from palm.inference.structured import Grammars, restrict

    vocab = tiny_config(tokenizer).vocab_size
    grammars = Grammars(tokenizer, vocab, [tokenizer.eos_id])
    schema = grammars.json({"type": "object", "properties": {"note": {"type": "string"}, "n": {"type": "integer"}}})
    rows = [grammars.constraint(schema) for _ in range(3)]
    for text, row in zip(['{"note": "a', '{"n": 1'], rows[1:]):  # xgrammar's separators have their space
        assert all(row.matcher.accept_token(token) for token in tokenizer.encode(text, bos=False))
    constraints = [rows[0], None, rows[1], rows[2]]
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    got = logits.clone()
    restrict(got, constraints)
    want = logits.clone()
    banned = [i for i in range(vocab) if not (int(grammars.keep[i // 32]) >> (i % 32)) & 1]
    assert banned and len(banned) < vocab // 4  # the control-character tokens, and not much else
    for i, c in enumerate(constraints):
        if c is None:
            continue
        bits = xgrammar.allocate_token_bitmask(1, vocab)
        c.matcher.fill_next_token_bitmask(bits)
        xgrammar.apply_token_bitmask_inplace(want[i : i + 1], bits)
        want[i, banned] = float("-inf")
    assert torch.equal(got, want)
    assert torch.equal(got[1], logits[1])
    inside = xgrammar.allocate_token_bitmask(1, vocab)  # inside a string xgrammar itself admits control tokens
    rows[1].matcher.fill_next_token_bitmask(inside)
    assert any((int(inside[0, i // 32]) >> (i % 32)) & 1 for i in banned)
    assert all(0 < int(torch.isfinite(got[i]).sum()) < vocab for i in (0, 2, 3))
