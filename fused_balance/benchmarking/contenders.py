"""The contenders: ways to do each stage (Gram, weights, combine, the whole pareto_combine, the
AdamW step on the combined gradient) that people write today, and ours through the public API.

Every contender gets the same gradients (a ``Case``) and returns, per stage, a zero-argument
callable that does the stage once and returns its result:
  gram -> [K, K] tensor; weights -> [K] tensor; combine / pareto_combine -> P tensors;
  adamw -> nothing (it steps its own copy of the parameters and optimizer state, exposed as
  ``fn.params`` so the suite can check the first step).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from fused_balance.benchmarking.oracles import exact_min_norm_weights, frank_wolfe_min_norm
from fused_balance.benchmarking.problems import LoraProblem, make_params

__all__ = ["Case", "Contender", "STAGES", "make_contenders", "ours_name", "ADAMW_HYPER", "CompileBudget"]

STAGES = ("gram", "weights", "combine", "pareto_combine", "adamw")
ADAMW_HYPER = {"lr": 1e-3, "weight_decay": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}


@dataclass
class Case:
    """One benchmark configuration and its inputs."""
    problem: LoraProblem
    num_objectives: int
    dtype: torch.dtype
    device: torch.device
    grads: list                       # grads[k][p]
    gram_in: torch.Tensor | None = None      # [1, K, K] fp32: input of the weights stage
    weights_in: torch.Tensor | None = None   # [1, K] fp32: input of combine / adamw
    param_seed: int = 1

    @property
    def K(self) -> int:
        return self.num_objectives

    @property
    def num_tensors(self) -> int:
        return len(self.grads[0])

    @property
    def num_params(self) -> int:
        return sum(g.numel() for g in self.grads[0])

    @property
    def element_size(self) -> int:
        return self.grads[0][0].element_size()

    @property
    def label(self) -> str:
        return f"{self.problem.name} K={self.K} {str(self.dtype).replace('torch.', '')}"


# ----------------------------------------------------------------------------------------------
# Shared building blocks

def stack_objectives(grads, dtype=None) -> torch.Tensor:
    """The [K, N] matrix of flattened, concatenated gradients (one copy: cat into each row)."""
    K = len(grads)
    N = sum(g.numel() for g in grads[0])
    first = grads[0][0]
    M = torch.empty(K, N, dtype=dtype or first.dtype, device=first.device)
    for k in range(K):
        torch.cat([g.reshape(-1) for g in grads[k]], out=M[k])
    return M


def split_like(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of a flat vector shaped like ``like`` (free: no copy)."""
    return [piece.view(t.shape) for piece, t in zip(torch.split(flat, [t.numel() for t in like]),
                                                     like)]


def _weights_list(weights: torch.Tensor) -> list[float]:
    return [float(x) for x in weights.reshape(-1).tolist()]


class _StepFn:
    """A callable AdamW step with its own state; ``params`` exposes the parameters."""

    def __init__(self, step: Callable[[], None], params: list[torch.Tensor]):
        self._step, self.params = step, params

    def __call__(self):
        self._step()


def _fresh_params(case: Case) -> list[torch.Tensor]:
    """The same initial parameters for every AdamW contender (deterministic)."""
    return make_params(case.problem, case.dtype, case.device, case.param_seed)


def _torch_adamw_step(case: Case, combine_into_grads: Callable[[list], None],
                      **optim_kw) -> _StepFn:
    """Separate combine (writing p.grad) + torch.optim.AdamW.step()."""
    h = ADAMW_HYPER
    params = [torch.nn.Parameter(p) for p in _fresh_params(case)]
    optimizer = torch.optim.AdamW(params, lr=h["lr"], betas=(h["beta1"], h["beta2"]),
                                  eps=h["eps"], weight_decay=h["weight_decay"], **optim_kw)

    def step():
        combine_into_grads(params)
        optimizer.step()

    return _StepFn(step, [p.data for p in params])


# ----------------------------------------------------------------------------------------------
# Contenders

class Contender:
    """Base: ``name`` (JSON key), ``label`` (tables), ``number`` (the brief's numbering),
    ``stages`` it takes part in, ``note`` (what exactly is timed)."""
    name = "?"
    label = "?"
    number = 0
    stages: tuple = ()
    note = ""
    is_ours = False
    solver_iterative = False   # an iterative min-norm solver (looser check for K > 2)
    reference = None           # check / ratio against this contender instead of the primary ours

    def unavailable(self, case: Case, stage: str) -> str | None:
        return None

    def prepare(self, case: Case, stage: str) -> Callable[[], object]:
        return getattr(self, f"_{stage}")(case)


class PythonLoop(Contender):
    name, label, number = "loop", "1 per-tensor loop (classic MGDA)", 1
    stages = ("gram", "weights", "combine", "pareto_combine", "adamw")
    note = ("a torch.dot and a host sync (.item()) per tensor per pair, K=2 closed form / "
            "Frank-Wolfe in Python, a Python sum per tensor for the combination; adamw: that "
            "combine into p.grad + torch.optim.AdamW(foreach=False)")
    solver_iterative = True

    @staticmethod
    def _gram_lists(grads) -> list[list[float]]:
        K = len(grads)
        G = [[0.0] * K for _ in range(K)]
        for tensors in zip(*grads):
            flats = [t.reshape(-1) for t in tensors]
            for i in range(K):
                for j in range(i, K):
                    G[i][j] += torch.dot(flats[i], flats[j]).item()
        for i in range(K):
            for j in range(i):
                G[i][j] = G[j][i]
        return G

    @staticmethod
    def _combine_lists(grads, w: list[float]) -> list[torch.Tensor]:
        out = []
        for tensors in zip(*grads):
            d = w[0] * tensors[0]
            for wk, g in zip(w[1:], tensors[1:]):
                d = d + wk * g
            out.append(d)
        return out

    def _gram(self, case):
        return lambda: torch.tensor(self._gram_lists(case.grads), dtype=torch.float64)

    def _weights(self, case):
        G = case.gram_in[0]
        return lambda: torch.tensor(frank_wolfe_min_norm(G.tolist()), dtype=torch.float64)

    def _combine(self, case):
        W = case.weights_in[0]
        return lambda: self._combine_lists(case.grads, _weights_list(W))

    def _pareto_combine(self, case):
        def run():
            w = frank_wolfe_min_norm(self._gram_lists(case.grads))
            return self._combine_lists(case.grads, w)
        return run

    def _adamw(self, case):
        W = case.weights_in[0]

        def combine_into_grads(params):
            for p, d in zip(params, self._combine_lists(case.grads, _weights_list(W))):
                p.grad = d
        return _torch_adamw_step(case, combine_into_grads, foreach=False)


class FlattenConcat(Contender):
    name, label, number = "flatcat", "2 flatten+concatenate", 2
    stages = ("gram", "combine", "pareto_combine")
    note = ("torch.cat of the flattened gradients into a [K, N] matrix M (one copy), "
            "G = M @ M.T, d = w @ M split back into views; K x K solve on the host (exact)")

    def _gram(self, case):
        return lambda: (lambda M: M @ M.T)(stack_objectives(case.grads))

    def _combine(self, case):
        W = case.weights_in.to(case.dtype)

        def run():
            M = stack_objectives(case.grads)
            return split_like((W @ M)[0], case.grads[0])
        return run

    def _pareto_combine(self, case):
        def run():
            M = stack_objectives(case.grads)
            w = exact_min_norm_weights((M @ M.T).tolist())
            W = torch.tensor([w], dtype=case.dtype, device=case.device)
            return split_like((W @ M)[0], case.grads[0])
        return run


class Foreach(Contender):
    name, label, number = "foreach", "3 best plain PyTorch (foreach)", 3
    stages = ("gram", "combine", "pareto_combine", "adamw")
    note = ("torch._foreach_norm for the diagonal, a torch.dot per tensor per pair summed on "
            "device (no sync) for the rest; combine: _foreach_mul + _foreach_add_ (one host "
            "read of the K weights); adamw: that combine as p.grad + AdamW(foreach=True)")

    @staticmethod
    def gram_tensor(grads) -> torch.Tensor:
        K = len(grads)
        G = torch.empty(K, K, dtype=torch.float32, device=grads[0][0].device)
        for i in range(K):
            norms = torch._foreach_norm(grads[i], 2, dtype=torch.float32)
            G[i, i] = torch.stack(norms).square().sum()
            for j in range(i + 1, K):
                dots = [torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(grads[i], grads[j])]
                G[i, j] = G[j, i] = torch.stack(dots).float().sum()
        return G

    @staticmethod
    def combine_lists(grads, w: list[float]) -> list[torch.Tensor]:
        out = torch._foreach_mul(grads[0], w[0])
        for wk, g in zip(w[1:], grads[1:]):
            torch._foreach_add_(out, g, alpha=wk)
        return out

    def _gram(self, case):
        return lambda: self.gram_tensor(case.grads)

    def _combine(self, case):
        W = case.weights_in[0]
        return lambda: self.combine_lists(case.grads, _weights_list(W))

    def _pareto_combine(self, case):
        def run():
            w = exact_min_norm_weights(self.gram_tensor(case.grads).tolist())
            return self.combine_lists(case.grads, w)
        return run

    def _adamw(self, case):
        W = case.weights_in[0]

        def combine_into_grads(params):
            for p, d in zip(params, self.combine_lists(case.grads, _weights_list(W))):
                p.grad = d
        return _torch_adamw_step(case, combine_into_grads, foreach=True)


class CompileBudget:
    """Total seconds the run may spend compiling (cold torch.compile is slow on 2 cores)."""

    def __init__(self, seconds: float, reason_if_zero: str = ""):
        self.seconds, self.spent, self.reason_if_zero = seconds, 0.0, reason_if_zero

    def exhausted(self) -> str | None:
        if self.seconds <= 0:
            return self.reason_if_zero or "torch.compile disabled (compile budget 0 s)"
        if self.spent >= self.seconds:
            return (f"compile budget exhausted ({self.spent:.0f} s of {self.seconds:.0f} s spent "
                    f"compiling earlier cases)")
        return None


def _gram_chunk(K: int, *tensors):
    """The reference Gram over one layer's tensors: K(K+1)/2 fp32 sums of products."""
    n = len(tensors) // K
    sums = []
    for i in range(K):
        for j in range(i, K):
            sums.append(sum(torch.sum(tensors[i * n + p].float() * tensors[j * n + p].float())
                            for p in range(n)))
    return torch.stack(sums)


def _combine_chunk(K: int, w: torch.Tensor, *tensors):
    """The reference combination over one layer's tensors: sum_k w_k g_k in fp32, cast back."""
    n = len(tensors) // K
    return tuple(sum(w[k] * tensors[k * n + p].float() for k in range(K)).to(tensors[p].dtype)
                 for p in range(n))


class Compiled(Contender):
    name, label, number = "compile", "4 torch.compile(reference)", 4
    stages = ("gram", "combine", "pareto_combine")
    note = ("torch.compile (inductor, static shapes) of the reference Gram / combine over one "
            "decoder layer's tensors, the compiled graph reused for every layer (compiling all "
            "448 Llama tensors as one graph took 458 s here); K x K solve on the host")

    def __init__(self, budget: CompileBudget):
        self.budget = budget
        self._compiled: dict = {}

    def unavailable(self, case, stage):
        return self.budget.exhausted()

    @staticmethod
    def _chunks(case):
        return [list(r) for r in case.problem.layer_ranges()]

    def _fn(self, kind):
        if kind not in self._compiled:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._compiled[kind] = torch.compile(_gram_chunk if kind == "gram" else _combine_chunk,
                                                 dynamic=False)
        return self._compiled[kind]

    def _timed_first_call(self, fn):
        start = time.perf_counter()
        result = fn()
        self.budget.spent += time.perf_counter() - start
        return result

    def _gram_runner(self, case):
        f, K, chunks = self._fn("gram"), case.K, self._chunks(case)
        args = [[case.grads[k][p] for k in range(K) for p in chunk] for chunk in chunks]
        iu = torch.triu_indices(K, K)

        def run():
            sums = f(K, *args[0])
            for a in args[1:]:
                sums = sums + f(K, *a)
            G = torch.empty(K, K, dtype=sums.dtype, device=sums.device)
            G[iu[0], iu[1]] = sums
            G[iu[1], iu[0]] = sums
            return G
        return run

    def _combine_runner(self, case):
        f, K, chunks = self._fn("combine"), case.K, self._chunks(case)
        args = [[case.grads[k][p] for k in range(K) for p in chunk] for chunk in chunks]

        def run(w: torch.Tensor):
            out = []
            for a in args:
                out.extend(f(K, w, *a))
            return out
        return run

    def _gram(self, case):
        run = self._gram_runner(case)
        self._timed_first_call(run)
        return run

    def _combine(self, case):
        combine = self._combine_runner(case)
        w = case.weights_in[0].to(torch.float32)
        self._timed_first_call(lambda: combine(w))
        return lambda: combine(w)

    def _pareto_combine(self, case):
        gram, combine = self._gram_runner(case), self._combine_runner(case)

        def run():
            w = exact_min_norm_weights(gram().tolist())
            return combine(torch.tensor(w, dtype=torch.float32, device=case.device))
        self._timed_first_call(run)
        return run


class TorchJD(Contender):
    number = 5
    stages = ("weights", "pareto_combine")

    def __init__(self, which: str):
        self.which = which
        self.name = f"torchjd_{which}"
        self.label = f"5 TorchJD {'MGDA' if which == 'mgda' else 'UPGrad'}"
        self.solver_iterative = which == "mgda"
        self.reference = None if which == "mgda" else "ours_upgrad"
        self.note = ("torchjd.aggregation." + ("MGDA()" if which == "mgda" else "UPGrad()") +
                     " on the stacked [K, N] Jacobian; the stacking (torch.cat, one copy) is "
                     "included in the time, the result is split back into views"
                     + ("" if which == "mgda" else "; bf16 gradients are stacked into fp32 "
                        "(its QP solver goes through NumPy, which has no bf16)"))
        if which == "upgrad":
            self.stages = ("pareto_combine",)

    def unavailable(self, case, stage):
        try:
            import torchjd.aggregation  # noqa: F401
        except Exception as exc:  # pragma: no cover - depends on the environment
            return f"torchjd not importable: {exc}"
        if self.which == "upgrad":
            try:
                import qpsolvers, quadprog  # noqa: F401,E401
            except ImportError:
                return ("TorchJD UPGrad needs qpsolvers and quadprog "
                        "(pip install qpsolvers quadprog)")
        return None

    def _weights(self, case):
        from torchjd.aggregation import MGDAWeighting
        weighting = MGDAWeighting()
        G = case.gram_in[0]
        return lambda: weighting(G)

    def _pareto_combine(self, case):
        from torchjd.aggregation import MGDA, UPGrad
        aggregator = MGDA() if self.which == "mgda" else UPGrad()
        low_precision = case.dtype in (torch.bfloat16, torch.float16)
        dtype = torch.float32 if (self.which == "upgrad" and low_precision) else None

        def run():
            d = aggregator(stack_objectives(case.grads, dtype))
            return split_like(d.to(case.dtype), case.grads[0])
        return run


def ours_name(backend: str) -> str:
    return f"ours_{backend}"


class Ours(Contender):
    number = 6
    stages = STAGES
    is_ours = True

    def __init__(self, backend: str, reason_unavailable: str | None = None):
        self.backend = backend
        self.name = ours_name(backend)
        self.label = f"6 ours [{backend}]"
        self._reason = reason_unavailable
        self.note = ("fused_balance public API: fb.gram, fb.min_norm_weights, fb.combine, "
                     "fb.pareto_combine(policy='mgda'), fb.balanced_adamw_step; "
                     f"backend={backend!r}")

    def unavailable(self, case, stage):
        return self._reason

    def _gram(self, case):
        import fused_balance as fb
        return lambda: fb.gram(case.grads, backend=self.backend)[0]

    def _weights(self, case):
        import fused_balance as fb
        G = case.gram_in
        return lambda: fb.min_norm_weights(G)[0]

    def _combine(self, case):
        import fused_balance as fb
        W = case.weights_in
        return lambda: fb.combine(case.grads, W, backend=self.backend)

    def _pareto_combine(self, case):
        import fused_balance as fb
        return lambda: fb.pareto_combine(case.grads, policy="mgda", backend=self.backend).combined

    def _adamw(self, case):
        import fused_balance as fb
        h = ADAMW_HYPER
        params = _fresh_params(case)
        exp_avgs = [torch.zeros_like(p) for p in params]
        exp_avg_sqs = [torch.zeros_like(p) for p in params]
        W = case.weights_in
        state = {"step": 0}

        def step():
            state["step"] += 1
            fb.balanced_adamw_step(case.grads, W, None, params, exp_avgs, exp_avg_sqs,
                                   lrs=h["lr"], weight_decays=h["weight_decay"],
                                   beta1=h["beta1"], beta2=h["beta2"], eps=h["eps"],
                                   step=state["step"], backend=self.backend)
        return _StepFn(step, params)


class OursUPGrad(Contender):
    """UPGrad through our passes: fb.gram, TorchJD's UPGrad weighting on the K x K Gram, then
    fb.combine: the like-for-like partner of TorchJD's UPGrad."""
    number = 6
    stages = ("pareto_combine",)
    is_ours = True   # checked against float64 (UPGrad weights of the exact Gram)

    def __init__(self, backend: str, reason_unavailable: str | None = None):
        self.backend = backend
        self.name = "ours_upgrad"
        self.label = f"6 ours [{backend}] + UPGrad weighting"
        self._reason = reason_unavailable
        self.note = ("fb.gram -> torchjd UPGradWeighting on the K x K Gram -> fb.combine: the "
                     "same UPGrad result without the [K, N] matrix")

    def unavailable(self, case, stage):
        if self._reason:
            return self._reason
        return TorchJD("upgrad").unavailable(case, stage)

    def _pareto_combine(self, case):
        import fused_balance as fb
        from torchjd.aggregation import UPGradWeighting
        weighting = UPGradWeighting()

        def run():
            G = fb.gram(case.grads, backend=self.backend)
            w = weighting(G[0])
            return fb.combine(case.grads, w[None].to(torch.float32), backend=self.backend)
        return run


class OursSeparateAdamW(Contender):
    """Our combine into p.grad, then torch.optim.AdamW (foreach or fused)."""
    number = 6
    stages = ("adamw",)

    def __init__(self, backend: str, flavour: str, reason_unavailable: str | None = None):
        self.backend, self.flavour = backend, flavour
        self.name = f"ours_combine+adamw_{flavour}"
        self.label = f"6 ours [{backend}] combine + AdamW({flavour}=True)"
        self._reason = reason_unavailable
        self.note = (f"fb.combine(out=p.grad) then torch.optim.AdamW({flavour}=True).step(): the "
                     "combined gradient is materialised and read again")

    def unavailable(self, case, stage):
        return self._reason

    def _adamw(self, case):
        import fused_balance as fb
        W = case.weights_in
        grads_out: list = []

        def combine_into_grads(params):
            if not grads_out:
                grads_out.extend(torch.empty_like(p) for p in params)
                for p, g in zip(params, grads_out):
                    p.grad = g
            fb.combine(case.grads, W, out=grads_out, backend=self.backend)
        return _torch_adamw_step(case, combine_into_grads, **{self.flavour: True})


def make_contenders(ours_backends: list[tuple[str, str | None]], compile_budget: CompileBudget,
                    ) -> list[Contender]:
    """All contenders; ``ours_backends``: (backend, reason it cannot run or None), the first
    runnable one is the primary (the one every ratio refers to)."""
    runnable = [b for b, reason in ours_backends if reason is None]
    primary = runnable[0] if runnable else "torch"
    contenders: list[Contender] = [Ours(b, r) for b, r in ours_backends]
    contenders += [PythonLoop(), FlattenConcat(), Foreach(), Compiled(compile_budget),
                   TorchJD("mgda"), TorchJD("upgrad"), OursUPGrad(primary),
                   OursSeparateAdamW(primary, "foreach"), OursSeparateAdamW(primary, "fused")]
    return contenders
