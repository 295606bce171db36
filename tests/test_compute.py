"""How training computes: activation checkpointing changes nothing but memory, bf16 compute copies follow
their fp32 weights after every step, and a bf16 run resumes bitwise."""

import json

import pytest
import torch
from conftest import lively_model, tiny_config
from safetensors.torch import load_file
from test_train import Killed, config, losses

from palm import PalmForCausalLM
from palm.training.compute import ComputeCopies, apply_activation_checkpointing, compile_blocks
from palm.training.train import train


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids[:, :-1], shift_labels=ids[:, 1:], skip_logits=True)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(tokenizer, mode):
    ids = torch.tensor([tokenizer.encode("activation checkpointing recomputes, 12 times over " * 3)] * 2)
    plain = lively_model(tiny_config(tokenizer, dropout=0.0)).train()
    checkpointed = lively_model(tiny_config(tokenizer, dropout=0.0)).train()
    apply_activation_checkpointing(checkpointed, mode=mode)
    assert all(block.gradient_checkpointing for block in checkpointed.model.layers)
    loss_a, grads_a = loss_and_grads(plain, ids)
    loss_b, grads_b = loss_and_grads(checkpointed, ids)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-6)


def test_compute_copies_are_bf16_and_their_gradients_reach_the_fp32_weights(tokenizer):
    ids = torch.tensor([tokenizer.encode("bf16 copies of fp32 weights") * 2] * 2)
    torch.manual_seed(0)
    model = PalmForCausalLM(tiny_config(tokenizer)).train()  # the paper's init, as training starts
    copies = ComputeCopies(model)
    assert all(c.dtype == torch.bfloat16 for c in copies.copies.values())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    reference = {n: g for n, g in loss_and_grads(model, ids)[1].items()}
    model.zero_grad(set_to_none=True)
    for half in (ids[:1], ids[1:]):  # two micro-batches, summed into the fp32 gradients
        with copies.in_use() as on_copies:
            out = on_copies(
                input_ids=half[:, :-1],
                shift_labels=half[:, 1:],
                skip_logits=True,
                num_items_in_batch=(ids.shape[1] - 1) * 2,
            )
            out.loss.backward()
        copies.accumulate_grads()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the fp32 weights are back in place
    assert all(c.grad is None for c in copies.copies.values())
    for name, param in model.named_parameters():
        assert param.grad.dtype == torch.float32
        # bf16 rounding only: a few percent at most, the most at the embedding, whose gradient comes back
        # through every block's bf16 backward
        error = (param.grad - reference[name]).norm() / reference[name].norm()
        assert error < 5e-2, (name, float(error))


def test_compute_copies_reuse_their_fp32_gradient_buffers_without_carrying_a_step_over(tokenizer):
    # The fp32 gradients are written into buffers kept from step to step (no fresh allocation of the
    # model's size per step); after the optimizer's zero_grad a step's gradient is that step's alone.
    batches = [torch.tensor([tokenizer.encode(text) * 2]) for text in ("the first step", "a second, other step")]
    torch.manual_seed(0)
    model = PalmForCausalLM(tiny_config(tokenizer)).train()

    def step(copies, ids):
        model.zero_grad(set_to_none=True)
        with copies.in_use():
            model(input_ids=ids[:, :-1], shift_labels=ids[:, 1:], skip_logits=True).loss.backward()
        copies.accumulate_grads()
        return {n: p.grad for n, p in model.named_parameters()}

    copies = ComputeCopies(model)
    first = {n: g.clone() for n, g in step(copies, batches[0]).items()}
    second = step(copies, batches[1])
    reference = step(ComputeCopies(model), batches[1])  # its own, new buffers
    for name, grad in second.items():
        assert grad.data_ptr() == copies._grad_buffers[name].data_ptr()
        assert reference[name].data_ptr() != grad.data_ptr()
        assert torch.equal(grad, reference[name]), name
    for name, grad in step(copies, batches[0]).items():
        assert torch.equal(grad, first[name]), name


def test_compute_copies_are_refreshed_after_every_optimizer_step(corpus_dir, tokenizer_dir, tmp_path):
    seen = []

    def check(run, record):
        for name, copy in run.copies.copies.items():
            seen.append(torch.equal(copy, run.copies.masters[name].detach().to(torch.bfloat16)))

    run = train(config(corpus_dir, tokenizer_dir, tmp_path, "bf16", dtype="bf16", max_steps=3), on_step=check)
    assert run.copies is not None and len(seen) == 3 * len(run.copies.copies) and all(seen)


def test_a_bf16_run_resumes_bitwise_and_tracks_fp32(corpus_dir, tokenizer_dir, tmp_path):
    straight = train(config(corpus_dir, tokenizer_dir, tmp_path, "straight", dtype="bf16"))

    def kill_at_10(run, record):
        if record["step"] == 10:
            raise Killed

    with pytest.raises(Killed):
        train(config(corpus_dir, tokenizer_dir, tmp_path, "killed", dtype="bf16"), on_step=kill_at_10)
    train(config(corpus_dir, tokenizer_dir, tmp_path, "killed", dtype="bf16"), resume=True)
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a) and a["model.norm.weight"].dtype == torch.float32
    fp32 = train(config(corpus_dir, tokenizer_dir, tmp_path, "fp32", dtype="fp32"))
    assert straight.step == fp32.step == 12
    for step, loss in losses(tmp_path / "fp32").items():
        assert abs(losses(tmp_path / "straight")[step] - loss) <= 2e-2 * loss  # bf16 tracks fp32
    assert json.loads((tmp_path / "straight" / "run.json").read_text())["loop"]["dtype"] == "bf16"


def test_regional_compilation_gives_the_same_loss(tokenizer):
    ids = torch.tensor([tokenizer.encode("compile one block, reuse it for all") * 2])
    eager = lively_model(tiny_config(tokenizer)).train()
    compiled = lively_model(tiny_config(tokenizer)).train()
    compile_blocks(compiled)
    loss_a, grads_a = loss_and_grads(eager, ids)
    loss_b, grads_b = loss_and_grads(compiled, ids)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-5)


def copies_loss_and_grads(model, ids):
    """One step's loss and fp32 gradients as `palm train` computes them in bf16: on the compute copies."""
    copies = ComputeCopies(model)
    model.zero_grad(set_to_none=True)
    with copies.in_use() as on_copies:
        out = on_copies(input_ids=ids[:, :-1], shift_labels=ids[:, 1:], skip_logits=True)
        out.loss.backward()
    copies.accumulate_grads()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_recomputes_from_the_compute_copies(tokenizer, mode, compiled):
    # The backward recomputes a checkpointed block from the weights the modules hold at that moment: they
    # must still be the bf16 copies the forward ran on (with fp32 weights back in place, full checkpointing
    # died in F.linear on mixed dtypes and selective in torch's CheckpointError).
    torch._dynamo.reset()  # each case compiles its own graphs, not the cache of the case before
    ids = torch.tensor([tokenizer.encode("recompute from the copies the forward used, 16 bits " * 2)] * 2)
    plain = lively_model(tiny_config(tokenizer, dropout=0.0)).train()
    checkpointed = lively_model(tiny_config(tokenizer, dropout=0.0)).train()
    apply_activation_checkpointing(checkpointed, mode=mode)
    if compiled:
        compile_blocks(plain)
        compile_blocks(checkpointed)
    loss_a, grads_a = copies_loss_and_grads(plain, ids)
    loss_b, grads_b = copies_loss_and_grads(checkpointed, ids)
    assert all(g.dtype == torch.float32 for g in grads_b.values())
    if not compiled:  # eager recomputes the same bf16 kernels on the same bf16 weights: the same bits
        assert torch.equal(loss_b, loss_a) and all(torch.equal(grads_b[n], grads_a[n]) for n in grads_a)
        return
    # Compiled, the checkpointed block is another graph, fused otherwise: bf16 rounding apart, the most at
    # the embedding, whose gradient comes back through every block's bf16 backward (as above).
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-3, atol=0)
    for name in grads_a:
        error = (grads_b[name] - grads_a[name]).norm() / grads_a[name].norm()
        assert error < 5e-2, (name, float(error))


@pytest.fixture(scope="module")
def bf16_straight(corpus_dir, tokenizer_dir, tmp_path_factory):
    """A bf16 run without checkpointing, the one the checkpointed runs must equal to the bit."""
    tmp = tmp_path_factory.mktemp("bf16-straight")
    train(config(corpus_dir, tokenizer_dir, tmp, "straight", dtype="bf16"))
    return tmp / "straight"


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_a_bf16_run_with_activation_checkpointing_is_the_run_without_and_resumes_bitwise(
    corpus_dir, tokenizer_dir, tmp_path, bf16_straight, mode
):
    def kill_at_10(run, record):
        if record["step"] == 10:
            raise Killed

    cfg = dict(dtype="bf16", activation_checkpointing=mode)
    with pytest.raises(Killed):
        train(config(corpus_dir, tokenizer_dir, tmp_path, "killed", **cfg), on_step=kill_at_10)
    train(config(corpus_dir, tokenizer_dir, tmp_path, "killed", **cfg), resume=True)
    assert losses(tmp_path / "killed") == losses(bf16_straight)
    a = load_file(str(bf16_straight / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
