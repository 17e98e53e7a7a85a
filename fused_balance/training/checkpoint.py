"""Checkpoints of a balanced training run: one file, everything needed to continue bitwise.

    from fused_balance.training import checkpoint
    checkpoint.save(path, model=model, pareto=balancer, scheduler=sched, extra={"epoch": 3})
    ...                                       # a new process: build the same objects, then
    extra = checkpoint.load(path, model=model, pareto=balancer, scheduler=sched)

What is saved: the model's state_dict (``model_state="trainable"``: only parameters that
require grad, i.e. the LoRA tensors, plus buffers), the ParetoLoRA state (settings, step and
skip counters, history, and its optimizer's state), an optimizer given separately (when it is
not the ParetoLoRA's own), the BalanceScheduler state, and the random number generators (torch
CPU, every CUDA device, Python's ``random``, NumPy's global one when NumPy is loaded), so
data order, dropout and sampling continue exactly. The file is written to a temporary name and
renamed, so a crash never leaves a half-written checkpoint (a temporary file left by a killed
save is removed by the next save of the same path); it carries a SHA-256 of its contents, checked
before anything is read, and is read with ``torch.load(weights_only=True)`` (no code runs while
loading). A truncated, corrupted or foreign file raises a ValueError saying so.

On CPU, continuing from a checkpoint gives bitwise the parameters of an uninterrupted run with
the same thread count (see tests/training/test_resume.py); on a GPU, as far as the kernels used are
deterministic.
"""
from __future__ import annotations

import copy
import glob
import hashlib
import io
import os
import random
import sys
import tempfile

import torch

__all__ = ["save", "load", "read", "rng_state", "set_rng_state", "FORMAT"]

FORMAT = "fused_balance.checkpoint/2"
_FORMATS = ("fused_balance.checkpoint/1", FORMAT)  # /1: no checksum
_MODEL_STATES = ("full", "trainable")


def rng_state() -> dict:
    """Every global random generator's state, in types torch.load(weights_only=True) accepts."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        name, keys, pos, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss),
                          float(cached))
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) != torch.cuda.device_count():
            raise ValueError(f"checkpoint holds {len(cuda_states)} CUDA generator states, this "
                             f"machine has {torch.cuda.device_count()} devices")
        torch.cuda.set_rng_state_all(cuda_states)
    if "numpy" in state:
        import numpy
        name, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def _model_state(model: torch.nn.Module, which: str) -> dict:
    full = model.state_dict()
    if which == "full":
        return full
    keep = {name for name, p in model.named_parameters() if p.requires_grad}
    keep |= {name for name, _ in model.named_buffers()}
    return {k: v for k, v in full.items() if k in keep}


def save(path, *, model: torch.nn.Module | None = None, pareto=None, optimizer=None, scheduler=None,
         extra=None, rng: bool = True, model_state: str = "full") -> None:
    """Write the given objects' state to ``path`` atomically (see the module docstring).
    ``extra``: anything torch.load(weights_only=True) reads back (numbers, strings, tensors,
    lists, dicts), e.g. the epoch or the data loader position."""
    from fused_balance.training.pareto_lora import ParetoLoRA
    from fused_balance.training.scheduler import BalanceScheduler

    if model_state not in _MODEL_STATES:
        raise ValueError(f"model_state must be one of {_MODEL_STATES}, got {model_state!r}")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if pareto is not None and not isinstance(pareto, ParetoLoRA):
        raise TypeError(f"pareto must be a ParetoLoRA, got {type(pareto).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch optimizer, got {type(optimizer).__name__}")
    if scheduler is not None and not isinstance(scheduler, BalanceScheduler):
        raise TypeError(f"scheduler must be a BalanceScheduler, got {type(scheduler).__name__}")
    state: dict = {"format": FORMAT}
    if model is not None:
        state["model"] = _model_state(model, model_state)
        state["model_state"] = model_state
    if pareto is not None:
        state["pareto"] = pareto.state_dict()
    if optimizer is not None and (pareto is None or optimizer is not pareto.optimizer):
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if rng:
        state["rng"] = rng_state()
    if extra is not None:
        state["extra"] = extra
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    prefix = _temp_prefix(path)
    for leftover in glob.glob(os.path.join(glob.escape(folder), glob.escape(prefix) + "*")):
        os.unlink(leftover)  # a save of this path killed before its rename (SIGKILL, power loss)
    payload = io.BytesIO()
    torch.save(state, payload)
    payload = payload.getvalue()
    handle, tmp = tempfile.mkstemp(prefix=prefix, dir=folder)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n")
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# The file: this line, the SHA-256 of the payload in hex and a newline, then the payload (what
# torch.save wrote). A flipped bit or a truncated file fails the checksum before anything loads.
_MAGIC = b"fused_balance.checkpoint/2 sha256 "


def _temp_prefix(path: str) -> str:
    return f".checkpoint-{os.path.basename(path)}-"


def read(path, map_location=None) -> dict:
    """The saved state as a dict (what ``load`` restores from), its checksum verified; a clear
    ValueError for a truncated, corrupted or foreign file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    if data.startswith(_MAGIC):
        header, _, payload = data.partition(b"\n")
        if hashlib.sha256(payload).hexdigest().encode() != header[len(_MAGIC):]:
            raise ValueError(f"checkpoint {path} is corrupted: its checksum does not match its contents "
                             "(a truncated file or flipped bits)")
        data = payload
    try:  # format/1 files (no checksum) are read as they are
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable fused_balance checkpoint (damaged, or another kind of "
                         f"file): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(state, dict) or state.get("format") not in _FORMATS:
        raise ValueError(f"{path} is not a fused_balance checkpoint ({FORMAT})")
    return state


def _check_model_state(model: torch.nn.Module, saved: dict, which: str) -> None:
    """Names and shapes, before anything is copied (load_state_dict copies as it goes)."""
    mine = model.state_dict()
    unknown = [k for k in saved if k not in mine]
    if unknown:
        raise ValueError(f"checkpoint has model entries this model lacks: {unknown[:5]}")
    if which == "full":
        absent = [k for k in mine if k not in saved]
        if absent:
            raise ValueError(f"checkpoint lacks model entries: {absent[:5]}")
    else:
        trainable = [n for n, p in model.named_parameters() if p.requires_grad and n in mine]
        absent = [k for k in trainable if k not in saved]
        if absent:
            raise ValueError(f"checkpoint lacks trainable parameters: {absent[:5]}")
    for k, v in saved.items():
        if tuple(v.shape) != tuple(mine[k].shape):
            raise ValueError(f"model entry {k!r}: checkpoint shape {tuple(v.shape)}, model {tuple(mine[k].shape)}")


def load(path, *, model: torch.nn.Module | None = None, pareto=None, optimizer=None, scheduler=None,
         rng: bool = True, map_location=None):
    """Restore what ``save`` wrote into freshly built objects of the same configuration and
    return ``extra``. Every object asked for must be in the checkpoint; names, shapes, settings
    and the optimizer moments' shapes are checked, and a refusal leaves every object as it was
    (those loaded before it are restored)."""
    state = read(os.fspath(path), map_location)
    wanted = {"model": model, "pareto": pareto, "scheduler": scheduler}
    if optimizer is not None and (pareto is None or optimizer is not pareto.optimizer):
        wanted["optimizer"] = optimizer
    absent = [name for name, obj in wanted.items() if obj is not None and name not in state]
    if rng and "rng" not in state:
        absent.append("rng")
    if absent:
        raise ValueError(f"checkpoint {path} holds no {absent} state")
    if model is not None:
        _check_model_state(model, state["model"], state["model_state"])
    # All or nothing: each object's state is kept (copied) before it is loaded, and every loaded
    # object is put back if a later one refuses its state (a scheduler of other components) or
    # the optimizer moments do not fit the parameters (a rank-4 run loaded into a rank-8 model).
    loads = []
    if pareto is not None:
        loads.append((pareto, state["pareto"]))
    if "optimizer" in wanted:
        loads.append((optimizer, state["optimizer"]))
    if scheduler is not None:
        loads.append((scheduler, state["scheduler"]))
    kept = []
    try:
        for obj, saved in loads:
            kept.append((obj, copy.deepcopy(obj.state_dict())))
            obj.load_state_dict(saved)
        for obj in (pareto.optimizer if pareto is not None else None, wanted.get("optimizer")):
            if obj is not None:
                _check_moments_fit(obj)
    except BaseException:
        for obj, before in reversed(kept):
            obj.load_state_dict(before)
        raise
    if model is not None:
        model.load_state_dict(state["model"], strict=state["model_state"] == "full")
    if rng:
        set_rng_state(state["rng"])
    return state.get("extra")


# Per-parameter optimizer states shaped like the parameter (AdamW, SGD with momentum, ...).
_PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def _check_moments_fit(optimizer: torch.optim.Optimizer) -> None:
    for g, group in enumerate(optimizer.param_groups):
        for j, p in enumerate(group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                if key in _PARAM_SHAPED and isinstance(value, torch.Tensor) and value.shape != p.shape:
                    raise ValueError(f"checkpoint optimizer state {key!r} of parameter {j} in group {g} has "
                                     f"shape {tuple(value.shape)}, the parameter {tuple(p.shape)}: the checkpoint "
                                     "is of another model configuration (e.g. another LoRA rank)")
