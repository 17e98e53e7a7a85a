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
renamed, so a crash never leaves a half-written checkpoint, and read with
``torch.load(weights_only=True)`` (no code runs while loading).

On CPU, continuing from a checkpoint gives bitwise the parameters of an uninterrupted run with
the same thread count (see tests/training/test_resume.py); on a GPU, as far as the kernels used are
deterministic.
"""
from __future__ import annotations

import os
import random
import sys
import tempfile

import torch

__all__ = ["save", "load", "rng_state", "set_rng_state", "FORMAT"]

FORMAT = "fused_balance.checkpoint/1"
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
    handle, tmp = tempfile.mkstemp(prefix=".checkpoint-", dir=folder)
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    return ``extra``. Every object asked for must be in the checkpoint; names, shapes and
    settings are checked before the first object is changed."""
    state = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fused_balance checkpoint ({FORMAT})")
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
    # Objects whose load_state_dict checks everything before changing anything go first.
    if pareto is not None:
        pareto.load_state_dict(state["pareto"])
    if "optimizer" in wanted:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if model is not None:
        model.load_state_dict(state["model"], strict=state["model_state"] == "full")
    if rng:
        set_rng_state(state["rng"])
    return state.get("extra")
