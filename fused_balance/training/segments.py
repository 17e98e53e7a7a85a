"""Segments: which tensors share one set of balancing weights.

Rules (``segments=``): ``"layer"`` (the default), ``"tensor"`` (one per tensor), ``"global"``
(one for all) or a callable ``(name, param) -> hashable key``.

``"layer"`` follows the model's module structure, read from the parameter names:

- a tensor inside a numbered block (``...layers.3.self_attn.q_proj...``, ``...blocks.0...``,
  ``...down.1.attn.0.q...``) belongs to the first numbered block on its path, keyed by the whole
  path up to the index: ``model.vision_tower.encoder.layers.0`` and ``model.language_model.layers.0``
  are different segments, and a VQ encoder's resolution level is one segment of its own;
- any other tensor belongs to the module that holds its layer: the parent of the LoRA-wrapped
  module (``model.aligner.fc1`` -> ``model.aligner``, ``model.multi_modal_projector.linear_1`` ->
  ``model.multi_modal_projector``), or the module itself when its parent is the model's top
  level or a bare wrapper (``lm_head``, ``model.embed_tokens``). A numbered leaf is a layer of
  its own in a layer stack (``layers.0`` of ``layers = ModuleList([Linear, ...])``) and else
  counts as its container's owner (``model.aligner.hidden_layers.0`` -> ``model.aligner``,
  ``model.visual.merger.mlp.0`` -> ``model.visual.merger``). There is no catch-all segment.

PEFT's wrapper names (``base_model.model.``, ``.lora_A.default``, ``.base_layer``,
``.modules_to_save.default``, ...) are not part of a key. ``describe_segments(model)`` prints the
grouping so it can be checked before training.
"""
from __future__ import annotations

import re
import sys
from typing import Callable, Mapping, Sequence

import torch

from fused_balance.training.bank import check_params

__all__ = ["lora_parameters", "layer_key", "segment_ids_for", "describe_segments", "named_parameters_of"]

_PEFT_PREFIX = "base_model.model."
# PEFT inserts these between a wrapped module and its tensors: ``q_proj.lora_A.default.weight``,
# ``embed.lora_embedding_A.default``, ``lm_head.modules_to_save.default.weight``, ``q_proj.base_layer``.
_PEFT_PARTS = re.compile(r"\.(?:(?:lora_[A-Za-z_]+|modules_to_save|original_module)(?:\.[^.]+)?|base_layer)(?=\.|$)")
_LEAF_ATTRIBUTES = ("weight", "bias")
_WRAPPERS = {"", "model", "transformer", "base_model"}
_LAYER_LISTS = {"layers", "layer", "h", "blocks", "block"}


def lora_parameters(model: torch.nn.Module, *, modules_to_save: bool = True,
                    layers: Callable[[str], bool] | Sequence[str] | None = None) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable LoRA tensors (``lora_A``/``lora_B``/``lora_embedding_*``/DoRA magnitudes)
    and ``modules_to_save`` copies of a PEFT model, as (name, parameter) in model order.

    Which tensors a balancer balances (pass the result to ``ParetoLoRA``; with
    ``fill="backward"`` every other trainable tensor gets the plain sum of the objectives'
    gradients): ``modules_to_save=False`` leaves out the fully trained copies (embeddings, heads),
    so only the LoRA factors are balanced; ``layers`` keeps the tensors whose ``layer_key`` is in
    the given keys or passes the given predicate (balance selected layer groups only)."""
    if layers is not None and not callable(layers):
        if isinstance(layers, (str, bytes)) or not isinstance(layers, (Sequence, set, frozenset)):
            raise TypeError(f"layers must be a predicate (layer key -> bool) or a collection of layer keys, "
                            f"got {type(layers).__name__}")
        keys = set(layers)
        layers = keys.__contains__
    named = [(name, p) for name, p in model.named_parameters()
             if p.requires_grad and ("lora_" in name or (modules_to_save and "modules_to_save" in name))]
    if layers is not None:
        named = [(name, p) for name, p in named if layers(layer_key(name))]
        if not named:
            raise ValueError("no LoRA tensor of the model is in the selected layers; the model's layer "
                             "keys are shown by describe_segments(model)")
    return named


def _owner(name: str) -> str:
    """The module a parameter belongs to, without PEFT's wrapper parts."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    name = _PEFT_PARTS.sub("", name)
    head, _, leaf = name.rpartition(".")
    # ``q_proj.weight`` -> ``q_proj``; a bare Parameter attribute (``embeddings.class_embedding``,
    # or a PEFT ParameterDict entry, already stripped above) is its own owner.
    return head if leaf in _LEAF_ATTRIBUTES and head else name


def layer_key(name: str) -> str:
    """The ``"layer"`` segment of a parameter name (see the module docstring):
    ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight`` -> ``model.layers.3``,
    ``base_model.model.model.aligner.fc1.lora_B.default.weight`` -> ``model.aligner``."""
    parts = _owner(name).split(".")
    # The first numbered block: an index followed by more of the owner's path.
    for i in range(len(parts) - 1):
        if parts[i].isdigit():
            return ".".join(parts[:i + 1])
    if len(parts) >= 2 and parts[-1].isdigit():
        if parts[-2] in _LAYER_LISTS:  # a stack of single-module layers: ``layers.0``
            return ".".join(parts)
        return ".".join(parts[:-2] or parts[:-1])  # a numbered part of a module: its owner
    parent = ".".join(parts[:-1])
    return ".".join(parts) if parent in _WRAPPERS else parent


def segment_ids_for(named_params: Sequence[tuple[str, torch.Tensor]],
                    segments: str | Callable = "layer") -> tuple[list[int], list[str]]:
    """(P segment ids, S segment names) for a segmentation rule; ids follow first appearance."""
    if segments == "global" or segments is None:
        return [0] * len(named_params), ["global"]
    if segments == "tensor":
        return list(range(len(named_params))), [n for n, _ in named_params]
    if segments == "layer":
        keyfn = lambda name, p: layer_key(name)  # noqa: E731
    elif callable(segments):
        keyfn = segments
    else:
        raise ValueError(f"segments must be 'layer', 'tensor', 'global' or a callable, got {segments!r}")
    ids, index = [], {}
    for name, p in named_params:
        try:
            key = keyfn(name, p)
            slot = index.setdefault(key, len(index))
        except Exception as exc:
            if keyfn is segments:  # the user's callable: say which parameter it failed on
                raise ValueError(f"the segments callable failed on parameter {name!r}: "
                                 f"{type(exc).__name__}: {exc}") from exc
            raise
        ids.append(slot)
    names = [str(k) for k in index]
    if len(set(names)) != len(names):  # two keys print alike (1 and "1"): the history could not tell them apart
        clash = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"the segments callable gave distinct keys that print the same ({clash}); return "
                         "keys whose str() differ")
    return ids, names


def named_parameters_of(model_or_params, owner: str = "ParetoLoRA") -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) pairs from a model (its LoRA tensors, or every trainable parameter of a
    model without LoRA) or from a sequence of parameters / (name, parameter) pairs; checked."""
    if isinstance(model_or_params, torch.nn.Module):
        named = lora_parameters(model_or_params)
        if not named:  # not a PEFT model: every trainable parameter
            named = [(n, p) for n, p in model_or_params.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameter (all have requires_grad=False)")
    elif isinstance(model_or_params, (torch.Tensor, str, bytes, Mapping)) or model_or_params is None:
        raise TypeError(f"{owner} needs an nn.Module or a sequence of parameters / (name, "
                        f"parameter) pairs, got {type(model_or_params).__name__}")
    else:
        try:
            items = list(model_or_params)
        except TypeError:
            raise TypeError(f"{owner} needs an nn.Module or a sequence of parameters, got "
                            f"{type(model_or_params).__name__}") from None
        named = [(str(x[0]), x[1]) if isinstance(x, tuple) and len(x) == 2 else (f"param.{i}", x)
                 for i, x in enumerate(items)]
    check_params([p for _, p in named], owner, names=[n for n, _ in named])
    return named


def describe_segments(model_or_named_params, segments: str | Callable = "layer", *,
                      file=None) -> dict[str, list[str]]:
    """The grouping ParetoLoRA would use: {segment name: [parameter names]}, in segment order.
    Printed (one line per segment: name, tensor count, element count, first tensors) to
    ``file`` (default stdout); pass ``file=False`` to only return it."""
    named = named_parameters_of(model_or_named_params, "describe_segments")
    ids, names = segment_ids_for(named, segments)
    groups: dict[str, list[str]] = {n: [] for n in names}
    sizes = dict.fromkeys(names, 0)
    for (pname, p), s in zip(named, ids):
        groups[names[s]].append(pname)
        sizes[names[s]] += p.numel()
    if file is not False:
        out = sys.stdout if file is None else file
        width = max(len(n) for n in names)
        print(f"{len(names)} segments over {len(named)} tensors:", file=out)
        for n in names:
            shown = ", ".join(groups[n][:2]) + (", ..." if len(groups[n]) > 2 else "")
            print(f"  {n:<{width}}  {len(groups[n]):4d} tensors  {sizes[n]:>10,d} elements  [{shown}]",
                  file=out)
    return groups
