"""Training checkpoints: the whole state of a run at a step, written atomically and read without pickle."""

from __future__ import annotations

import json
import shutil
import warnings
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from ..core.atomic import DiskFullError, atomic_directory, write_json
from ..core.errors import CheckpointError
from ..core.rundir import RunLayout, checkpoint_step
from .dcpjson import JsonReader, JsonWriter

# Training checkpoints: RUN/checkpoints/step-NNNNNNN/ holds model.safetensors (fp32 master weights,
# tied embedding once), optimizer.safetensors (every state tensor) and state.json (the rest: step,
# data position, optimizer scalars and groups, and the checkpoint's format). No pickle anywhere, so a
# checkpoint can be opened safely.
#
# A sharded (FSDP) run instead writes shards/, a torch.distributed.checkpoint folder in which every
# rank writes its own pieces of the model and optimizer tensors under their parameter names (FQNs),
# with JSON metadata (palm.training.dcpjson), beside the same state.json. Either kind loads into either kind of
# run, at any world size: DCP reshards on load, and a safetensors checkpoint is cut into shards by
# set_state_dict. Only the format state.json names is ever read.
SHARDS = "shards"
SAFETENSORS, SHARDED = "safetensors", "sharded"
PICKLED_DCP = "dcp"  # palm 0.1's sharded format: DCP's own pickled metadata, refused


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict = {}
    for idx, entries in state_dict["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"state": scalars, "param_groups": state_dict["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, entries in meta["state"].items():
        state.setdefault(int(idx), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_checkpoint(layout: RunLayout, step: int, model, optimizer, state: dict, keep: int) -> Path:
    """Atomically write the checkpoint for `step`, then delete all but the newest `keep`."""
    out = layout.checkpoint(step)
    tensors, meta = _flatten_optimizer(optimizer.state_dict())
    try:
        with atomic_directory(out, overwrite=True, replace_all=True) as tmp:
            save_model(model, str(tmp / "model.safetensors"))
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            write_json(tmp / "state.json", {**state, "step": step, "format": SAFETENSORS, "optimizer": meta})
    except DiskFullError as e:
        weights = {id(t): t for t in model.state_dict().values()}.values()  # a tied tensor is written once
        need = sum(t.numel() * t.element_size() for t in [*weights, *tensors.values()])
        kept = list_checkpoints(layout)
        raise CheckpointError(
            f"no space left on the device to write the checkpoint {out}: it needs about {need / 1e6:,.1f} MB and "
            f"{e.free / 1e6:,.1f} MB are free; "
            + (f"{kept[-1].name} is intact: free some space, then --resume" if kept else "no checkpoint was written")
        ) from None
    for old in list_checkpoints(layout)[:-keep]:
        _remove(old)
    return out


def _zero_optimizer_state(optimizer) -> None:
    # get_state_dict/set_state_dict materialise an optimizer's lazy state by taking one step with
    # zero gradients and lr 0. That leaves the weights alone but counts a step (and PalmAdafactor
    # stores eps1 in v), which would shift beta2 and bias corrections by one for the rest of the
    # run. Zero moments and a zero step count are exactly what the first real step would create.
    for entry in optimizer.state.values():
        for key, value in entry.items():
            if torch.is_tensor(value):
                value.zero_()
            elif key == "step":
                entry[key] = 0


def _state_dicts(model, optimizer) -> tuple[dict, dict]:
    """FQN-keyed (and, for a sharded model, sharded) state dicts that alias the live tensors."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    fresh = not optimizer.state
    model_sd, optim_sd = get_state_dict(model, optimizer)
    if fresh:
        _zero_optimizer_state(optimizer)
        model_sd, optim_sd = get_state_dict(model, optimizer)  # the scalars are copies: take them again
    return model_sd, optim_sd


def _split_optimizer(optim_sd: dict) -> tuple[dict, dict]:
    """({"state": tensors}, {"state": everything else, "param_groups": ...}): DCP takes the first, JSON the rest."""
    tensors: dict = {}
    scalars: dict = {}
    for fqn, entries in optim_sd["state"].items():
        for key, value in entries.items():
            (tensors if torch.is_tensor(value) else scalars).setdefault(fqn, {})[key] = value
    return {"state": tensors}, {"state": scalars, "param_groups": optim_sd["param_groups"]}


def save_sharded_checkpoint(layout: RunLayout, step: int, model, optimizer, state: dict, keep: int) -> Path:
    """Collective: every rank writes its shards of `step` into one temporary folder, which rank 0
    renames into place only when all of them (and state.json) are complete.

    Multi-node runs need RUN on a file system that every node sees.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    out = layout.checkpoint(step)
    main = dist.get_rank() == 0
    try:
        with ExitStack() as stack:
            tmp = stack.enter_context(atomic_directory(out, overwrite=True, replace_all=True)) if main else None
            box = [str(tmp) if main else None]
            dist.broadcast_object_list(box, src=0)  # the others write into rank 0's temporary folder
            model_sd, optim_sd = _state_dicts(model, optimizer)
            tensors, rest = _split_optimizer(optim_sd)
            # Returns on rank 0 once every rank has reported its writes done and the metadata is written;
            # a failure on any rank is raised on all of them.
            dcp.save({"model": model_sd, "optimizer": tensors}, storage_writer=JsonWriter(Path(box[0]) / SHARDS))
            if main:
                write_json(tmp / "state.json", {**state, "step": step, "format": SHARDED, "optimizer": rest})
    except (OSError, CheckpointException) as e:
        raise CheckpointError(f"could not write checkpoint {out} (the last complete one is kept): {e}") from None
    if main:
        for old in list_checkpoints(layout)[:-keep]:
            _remove(old)
    return out


def _remove(path: Path) -> None:
    """Delete an old checkpoint; a symbolic link is removed itself, never what it points to."""
    path.unlink() if path.is_symlink() else shutil.rmtree(path)


def list_checkpoints(layout: RunLayout | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first by step number (temporary folders of an interrupted
    save are skipped)."""
    layout = layout if isinstance(layout, RunLayout) else RunLayout(layout)
    if not layout.checkpoints.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in layout.checkpoints.iterdir() if (p / "state.json").is_file()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def _is_sharded(model) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def _load_sharded(path: Path, model, optimizer, rest: dict) -> None:
    """Sharded checkpoint into any model: the current (possibly sharded) state dicts are the templates
    that dcp.load fills in place, resharding from however many ranks wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_sd, optim_sd = _state_dicts(model, optimizer)
    tensors, _ = _split_optimizer(optim_sd)
    with warnings.catch_warnings():  # loading without a process group is meant: resuming on one process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": model_sd, "optimizer": tensors}, storage_reader=JsonReader(path / SHARDS))
    for fqn, entries in rest["state"].items():
        optim_sd["state"].setdefault(fqn, {}).update(entries)
    optim_sd["param_groups"] = rest["param_groups"]
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)


def _load_full_into_sharded(path: Path, model, optimizer, meta: dict) -> None:
    """safetensors checkpoint into a sharded model: each rank reads the full tensors and keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    weights = load_file(str(path / "model.safetensors"))
    if model.config.tie_word_embeddings:  # save_model wrote the shared tensor under one of its two names
        embed, head = "model.embed_tokens.weight", "lm_head.weight"
        weights.setdefault(embed, weights.get(head))
        weights.setdefault(head, weights[embed])
    if set(weights) != set(model.state_dict()):
        raise CheckpointError(f"{path} does not match this model: {sorted(set(weights) ^ set(model.state_dict()))}")
    # Optimizer state is saved by position in the parameter list, which follows named_parameters().
    names = [name for name, _ in model.named_parameters()]
    flat = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), meta)
    optim_sd = {
        "state": {names[idx]: entry for idx, entry in flat["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in flat["param_groups"]],
    }
    set_state_dict(
        model,
        optimizer,
        model_state_dict=weights,  # type: ignore[arg-type]
        optim_state_dict=optim_sd,  # type: ignore[arg-type]
        options=StateDictOptions(full_state_dict=True),
    )
    if not optim_sd["state"]:  # saved before the first step
        _zero_optimizer_state(optimizer)


def load_training_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore model and optimizer in place from a checkpoint folder; returns its state.json.

    Collective when the checkpoint or the model is sharded: every rank of the run calls it.
    """
    from torch.distributed.checkpoint.api import CheckpointException  # DCP's failures are BaseExceptions

    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        kind = state.get("format", SAFETENSORS)  # palm 0.1 wrote no format for safetensors checkpoints
        if kind == PICKLED_DCP:
            raise CheckpointError(
                f"checkpoint {path} is in palm 0.1's sharded format, whose pickled metadata can run code "
                "when loaded; palm does not read it (resume from a checkpoint written by this version)"
            )
        if kind == SHARDED:
            _load_sharded(path, model, optimizer, state.pop("optimizer"))
            return state
        if kind != SAFETENSORS:
            raise CheckpointError(f"checkpoint {path} has an unknown format {kind!r}")
        if _is_sharded(model):
            _load_full_into_sharded(path, model, optimizer, state.pop("optimizer"))
            return state
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        # The tied head is saved once, under the embedding's name (a LoRA model prefixes both names).
        if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
            raise CheckpointError(f"{path} does not match this model (missing {missing}, unexpected {unexpected})")
        optimizer.load_state_dict(
            _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), state.pop("optimizer"))
        )
    except CheckpointError:
        raise
    except (
        OSError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
        AttributeError,
        RuntimeError,
        SafetensorError,
        CheckpointException,
    ) as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or does not match: {type(e).__name__}: {e}".splitlines()[0]
        ) from None
    return state
