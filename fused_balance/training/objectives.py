"""ParetoLoRA's objectives: their names (given, or None until the first losses arrive; then fixed),
a losses dict checked and put in their order, and the ``magnitude`` argument (a rule, or the
name of the objective to protect) resolved to what the policy takes.

A protected objective's name is checked once, when the objectives become known (at construction
or with the first losses), never per step.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from fused_balance.policies import MAGNITUDE_RULES, check_policy_args

__all__ = ["Objectives", "check_magnitude", "magnitude_rule"]


def magnitude_rule(magnitude, objectives):
    """The policy's magnitude argument: a rule name as it is, an objective's name as its index."""
    if isinstance(magnitude, str) and magnitude not in MAGNITUDE_RULES:
        return list(objectives).index(magnitude)
    return magnitude


def _check_protected(magnitude, objectives) -> None:
    """``magnitude``, when it names an objective to protect, is one of ``objectives``."""
    if isinstance(magnitude, str) and magnitude not in MAGNITUDE_RULES and magnitude not in objectives:
        raise ValueError(f"magnitude must be one of {MAGNITUDE_RULES} or the name of an objective to "
                         f"protect ({list(objectives)}), got {magnitude!r}")


def check_magnitude(policy, tau, rescale, magnitude, objectives) -> None:
    """The policy arguments with ``magnitude`` a rule or the name of an objective to protect,
    which must be one of ``objectives`` once they are known."""
    if isinstance(magnitude, str) and magnitude not in MAGNITUDE_RULES:
        if objectives is not None:
            _check_protected(magnitude, objectives)
        check_policy_args(policy, tau, rescale, 0)  # as a protected objective
        return
    if not (magnitude is None or isinstance(magnitude, str)):
        raise TypeError(f"magnitude must be one of {MAGNITUDE_RULES} or an objective's name, got {magnitude!r}")
    check_policy_args(policy, tau, rescale, magnitude)


class Objectives:
    """The objectives' names: ``names`` is None until they are known, then fixed (``fix``)."""

    def __init__(self, names: Sequence[str] | None = None):
        if names is not None:
            if isinstance(names, (str, bytes)) or not all(isinstance(o, str) for o in names):
                raise TypeError(f"objectives must be a sequence of names (str), got {names!r}")
            if not names or len(set(names)) != len(list(names)):
                raise ValueError(f"objectives must be distinct names, at least one: {names!r}")
        self.names: list[str] | None = list(names) if names is not None else None

    def order(self, losses: Mapping[str, torch.Tensor], magnitude) -> list[str]:
        """The names of ``losses`` in objective order, checked: a non-empty dict with str keys,
        exactly the objectives once they are known. When they become known here, a
        ``magnitude`` naming an objective must be one of them. Changes nothing: ``fix`` the
        names once the losses passed every other check too."""
        if not isinstance(losses, Mapping):
            raise TypeError("losses must be a dict {objective name: scalar loss tensor}, got "
                            f"{type(losses).__name__}")
        if not losses:
            raise ValueError("losses is empty: expected {objective name: scalar loss tensor}")
        expected = self.names if self.names is not None else list(losses)
        if any(not isinstance(name, str) for name in losses):
            raise TypeError(f"objective names must be str, got {list(losses)!r}")
        missing = [name for name in expected if name not in losses]
        unknown = [name for name in losses if name not in expected]
        if missing or unknown:
            parts = ([f"missing objective(s) {missing}"] if missing else []) + \
                    ([f"unknown objective(s) {unknown}"] if unknown else [])
            raise ValueError(f"losses: {'; '.join(parts)} (this ParetoLoRA balances {expected})")
        if self.names is None:  # a protected objective's name, checked once its objectives are known
            _check_protected(magnitude, expected)
        return list(expected)

    def fix(self, names: Sequence[str]) -> None:
        self.names = list(names)

    def at_fault(self, losses: torch.Tensor, gram: torch.Tensor | None) -> tuple[list[str], list[str]]:
        """For a skipped step: (objectives with a NaN/Inf loss in ``losses`` [K], objectives with
        a NaN/Inf gradient under a finite loss, read from the diagonal of ``gram`` [S, K, K])."""
        finite_losses = torch.isfinite(losses).tolist()
        bad = [name for name, ok in zip(self.names, finite_losses) if not ok]
        bad_grads = []
        if gram is not None:  # a NaN/Inf gradient under a finite loss shows on G's diagonal
            finite_norms = torch.isfinite(torch.diagonal(gram, dim1=-2, dim2=-1)).all(0).tolist()
            bad_grads = [name for name, ok, loss_ok in zip(self.names, finite_norms, finite_losses)
                         if not ok and loss_ok]
        return bad, bad_grads
