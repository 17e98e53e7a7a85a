"""Benchmark problems: LoRA adapter shapes computed from model dimensions (nothing downloaded),
and deterministic random gradients for K objectives.

LoRA on a linear layer in -> out adds A [r, in] and B [out, r]. A decoder layer has seven
linears: q, k, v, o (hidden -> hidden), gate, up (hidden -> intermediate), down
(intermediate -> hidden), so 14 LoRA tensors per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LoraProblem", "decoder_lora_problem", "synthetic_problem", "PROBLEMS", "get_problem",
           "QUICK_PROBLEMS", "FULL_PROBLEMS", "make_gradients", "make_params"]


@dataclass(frozen=True)
class LoraProblem:
    name: str
    description: str
    shapes: tuple[tuple[int, ...], ...]   # one shape per LoRA tensor
    layer_of: tuple[int, ...]             # decoder layer of each tensor (per-layer segments)

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)

    @property
    def num_params(self) -> int:
        total = 0
        for shape in self.shapes:
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    @property
    def num_layers(self) -> int:
        return (max(self.layer_of) + 1) if self.layer_of else 0

    def layer_ranges(self) -> list[range]:
        """Contiguous tensor index ranges, one per layer (tensors are stored layer by layer)."""
        ranges, start = [], 0
        for p in range(1, self.num_tensors + 1):
            if p == self.num_tensors or self.layer_of[p] != self.layer_of[start]:
                ranges.append(range(start, p))
                start = p
        return ranges

    def summary(self) -> dict:
        return {"name": self.name, "description": self.description,
                "num_tensors": self.num_tensors, "num_params": self.num_params,
                "num_layers": self.num_layers}


def decoder_lora_problem(name: str, description: str, num_layers: int, hidden: int,
                         intermediate: int, rank: int) -> LoraProblem:
    linears = [(hidden, hidden)] * 4 + [(hidden, intermediate)] * 2 + [(intermediate, hidden)]
    shapes, layer_of = [], []
    for layer in range(num_layers):
        for fan_in, fan_out in linears:
            shapes += [(rank, fan_in), (fan_out, rank)]   # A, then B
            layer_of += [layer, layer]
    return LoraProblem(name, description, tuple(shapes), tuple(layer_of))


def synthetic_problem(num_params: int, num_tensors: int, rank: int = 16) -> LoraProblem:
    """``num_tensors`` equal LoRA-like tensors [rank, cols] holding about ``num_params`` in all
    (the scaling sweeps); one tensor per 'layer' so per-layer segments are per tensor."""
    cols = max(1, round(num_params / (num_tensors * rank)))
    shapes = tuple((rank, cols) for _ in range(num_tensors))
    return LoraProblem(f"synthetic-P{num_tensors}-N{rank * cols * num_tensors}",
                       f"{num_tensors} tensors of [{rank}, {cols}]", shapes,
                       tuple(range(num_tensors)))


PROBLEMS = {
    "small": decoder_lora_problem(
        "small", "4-layer decoder, hidden 1024, intermediate 2816, LoRA r=16 on all linears",
        4, 1024, 2816, 16),
    "llama2-7b-slice": decoder_lora_problem(
        "llama2-7b-slice", "first 4 of Llama-2-7B's 32 layers, LoRA r=16 on all linears",
        4, 4096, 11008, 16),
    "llama2-7b": decoder_lora_problem(
        "llama2-7b", "Llama-2-7B (32 layers, hidden 4096, intermediate 11008), LoRA r=16 on "
        "q,k,v,o,gate,up,down", 32, 4096, 11008, 16),
    "emu2-llm": decoder_lora_problem(
        "emu2-llm", "Emu2-sized 60-layer LLM (hidden 6656, intermediate 17920), LoRA r=16 on all "
        "linears", 60, 6656, 17920, 16),
}
QUICK_PROBLEMS = ("small", "llama2-7b-slice")
FULL_PROBLEMS = ("small", "llama2-7b", "emu2-llm")


def get_problem(name: str) -> LoraProblem:
    try:
        return PROBLEMS[name]
    except KeyError:
        raise ValueError(f"unknown problem {name!r}; choose from {sorted(PROBLEMS)}") from None


# Objective k's gradient is scale_k * (mix_k * shared + own noise): alternating signs make the
# objectives conflict (negative cosines), the scales make their norms differ, so the min-norm
# weights are neither trivial nor degenerate.
_SCALES = (1.0, 0.35, 1.7, 0.8, 1.2, 0.6, 2.0, 0.9)
_MIXES = (1.0, -0.8, 0.5, -0.3, 0.7, -0.6, 0.4, -0.2)


def make_gradients(problem: LoraProblem, num_objectives: int, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", seed: int = 0) -> list[list[torch.Tensor]]:
    """K lists of P gradient tensors (grads[k][p]), the same for a given seed whatever the
    device: drawn on the CPU in fp32 tensor by tensor, then cast and moved. Each objective has
    its own random stream, so the first K objectives do not depend on how many are drawn."""
    K = num_objectives
    if not 1 <= K <= len(_SCALES):
        raise ValueError(f"num_objectives must lie in [1, {len(_SCALES)}]")
    shared_stream = torch.Generator().manual_seed(1000 * seed + 999)
    streams = [torch.Generator().manual_seed(1000 * seed + k) for k in range(K)]
    grads: list[list[torch.Tensor]] = [[] for _ in range(K)]
    for shape in problem.shapes:
        shared = torch.randn(shape, generator=shared_stream)
        for k in range(K):
            g = torch.randn(shape, generator=streams[k])
            g.add_(shared, alpha=_MIXES[k]).mul_(_SCALES[k] * 1e-3)
            grads[k].append(g.to(device=device, dtype=dtype))
    return grads


def make_params(problem: LoraProblem, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", seed: int = 1) -> list[torch.Tensor]:
    """LoRA parameters of the problem's shapes, small (|p| ~ 0.02) so that a bf16 parameter can
    still resolve an AdamW update of lr ~ 1e-3."""
    generator = torch.Generator().manual_seed(seed)
    return [(0.02 * torch.randn(shape, generator=generator)).to(device=device, dtype=dtype)
            for shape in problem.shapes]
