"""Training arms of the unified-model study: the same model init, batches and steps for each.

- ``vanilla``: AdamW on the plain sum text + image (every ``diag_every`` steps the two
  objectives' per-layer gradient norms are observed through a ``policy="sum"`` ParetoLoRA,
  whose combination is exactly the sum's gradient).
- ``static``: AdamW on text + w·image with w tuned on the validation split (see run.py).
- ``gradnorm``: GradNorm (Chen et al., 2018) over every shared LoRA tensor (those both
  objectives reach; their concatenation is GradNorm's shared layer W): loss Σ w_i L_i,
  G_i = w_i |∇_W L_i|, target Ḡ · r_i^α with r_i = (L_i/L_i(0)) / mean_j(L_j/L_j(0)); w moves
  down the gradient of Σ_i |G_i − target_i| (target held constant, as in the paper), then is
  renormalised to Σ w_i = 2 (see ``GradNorm``). α is the arm's ``alpha`` (tuned on the
  validation split, see run.py), else the config's ``gradnorm_alpha``. The two objectives'
  gradients are taken once per step; the network's gradient is their weighted sum.
- ``mgda``: ParetoLoRA(policy="mgda") per layer (min-norm point every step).
- ``pareto``: ParetoLoRA(policy="pareto_lora", tau, segments, magnitude) — the method under
  study (``magnitude``: its rule where the norms differ by more than tau; default "mean").

Every arm clips the final gradient to a global norm of ``clip`` before AdamW (the balancers
write their combination with ``ParetoLoRA.backward``, then the loop clips and steps): without
it, Pareto-LoRA's rescale branch (weights up to ~60 on the smaller gradient) made the tiny
models diverge at lr 5e-3 in a trial run.
"""
from __future__ import annotations

import re
import time

import torch

_DECODER_LAYER = re.compile(r"\.layers\.\d+$")

OBJECTIVES = ("text", "image")


def layer_group_segments(layers: int, groups: int):
    """Segments callable: the decoder's layers in ``groups`` consecutive groups, the rest apart."""
    from fused_balance.training import layer_key

    size = max(1, -(-layers // groups))

    def key(name, _param):
        k = layer_key(name)
        if not _DECODER_LAYER.search(k):  # embeddings, heads: their own segments
            return k
        first = size * (int(k.rsplit(".", 1)[1]) // size)
        return f"layers {first}..{first + size - 1}"
    return key


def gradnorm_weight_grad(weights, shared_norms, losses, initial_losses, alpha: float) -> torch.Tensor:
    """d/dw of GradNorm's Σ_i |G_i − Ḡ r_i^α| with the target held constant (Chen et al., 2018):
    G_i = w_i |∇_W L_i| is linear in w_i, so the gradient is sign(G_i − target_i) |∇_W L_i|
    (no second backward pass is needed)."""
    G = weights * shared_norms
    ratio = (losses / initial_losses) / (losses / initial_losses).mean()
    target = G.mean() * ratio.pow(alpha)
    return torch.sign(G - target) * shared_norms


def reached_by_all(grads) -> list[int]:
    """Indices of the tensors every objective reaches (``grads[k][p]`` is None where objective k
    does not reach tensor p, as ``torch.autograd.grad(..., allow_unused=True)`` returns)."""
    return [p for p in range(len(grads[0])) if all(g[p] is not None for g in grads)]


def shared_norms(grads, shared: list[int]) -> torch.Tensor:
    """[K] float64: each objective's gradient norm over the ``shared`` tensors together."""
    return torch.stack([torch.sqrt(sum(g[p].double().pow(2).sum() for p in shared)) for g in grads])


class GradNorm:
    """GradNorm's task weights (Chen et al., 2018): ``update(norms, losses)`` moves them one step
    of their own Adam down the gradient of Σ_i |w_i n_i − Ḡ r_i^α| (``gradnorm_weight_grad``),
    then clamps them positive and renormalises them to Σ w_i = K. The first losses seen are L(0)."""

    def __init__(self, num_objectives: int, alpha: float, lr: float):
        self.alpha = float(alpha)
        self._weights = torch.ones(num_objectives, dtype=torch.float64, requires_grad=True)
        self._optimizer = torch.optim.Adam([self._weights], lr=lr)
        self.initial_losses = None

    @property
    def weights(self) -> torch.Tensor:
        return self._weights.detach().clone()

    def weight_grad(self, norms: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        losses = losses.detach().double()
        initial = losses if self.initial_losses is None else self.initial_losses
        return gradnorm_weight_grad(self._weights.detach(), norms.double(), losses, initial, self.alpha)

    def update(self, norms: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """One step from this step's per-objective shared-gradient norms and losses; the new weights."""
        if self.initial_losses is None:
            self.initial_losses = losses.detach().double().clone()
        self._weights.grad = self.weight_grad(norms, losses)
        self._optimizer.step()
        with torch.no_grad():
            self._weights.clamp_(min=1e-3)
            self._weights.mul_(len(self._weights) / self._weights.sum())
        return self.weights


def _segments(arm: dict, cfg: dict):
    seg = arm.get("segments", "layer")
    return layer_group_segments(cfg["layers"], 2) if seg == "group" else seg


def train_unified(family: str, arm: dict, seed: int, cfg: dict, split: dict) -> dict:
    """One run; returns metrics on ``split`` (a make_split dict) every eval_every steps."""
    from fused_balance.study.unified import build_lora_model, evaluate, train_batch, trainable
    from fused_balance.study.data import TRAIN_SEED_BASE
    from fused_balance.training import ParetoLoRA

    started = time.perf_counter()
    model = build_lora_model(family, seed=seed, hidden=cfg["hidden"], layers=cfg["layers"],
                             rank=cfg["rank"], visual_dim=cfg["visual_dim"], visual_scale=cfg["visual_scale"])
    named = trainable(model)
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0, foreach=True)
    kind = arm["kind"]
    balancer = None
    if kind in ("mgda", "pareto"):
        balancer = ParetoLoRA(named, optimizer, policy="mgda" if kind == "mgda" else "pareto_lora",
                              tau=arm.get("tau", 5.0), segments=_segments(arm, cfg),
                              magnitude=arm.get("magnitude", "mean"),
                              objectives=list(OBJECTIVES), history_every=cfg["diag_every"])
    elif kind == "vanilla":
        observer = ParetoLoRA(named, None, policy="sum", segments="layer", objectives=list(OBJECTIVES))
    elif kind == "gradnorm":
        gradnorm = GradNorm(len(OBJECTIVES), alpha=arm.get("alpha", cfg["gradnorm_alpha"]), lr=cfg["gradnorm_lr"])
        lora = {i for i, (n, _) in enumerate(named) if "lora_" in n}
        shared = None  # the LoRA tensors both objectives reach, found on the first step
        norms_log = []
    rng = torch.Generator().manual_seed(TRAIN_SEED_BASE + seed)  # same batches in every arm
    curve, evals, ratios, weights_log = {k: [] for k in OBJECTIVES}, [], [], []
    for step in range(cfg["steps"]):
        batch = train_batch(rng, cfg["batch_size"], cfg["generation_fraction"], cfg["max_objects"])
        losses = model.losses(batch)
        if balancer is not None:  # writes the combination into .grad; every arm clips and steps below
            balancer.backward(losses, accumulate=False)
        elif kind == "vanilla" and step % cfg["diag_every"] == 0:
            res = observer.backward(losses, accumulate=False)  # == the sum's gradient
            norms = res.norms.double()
            for s, name in enumerate(observer.segment_names):
                # decoder layers only (embeddings and heads have segments of their own, some
                # reached by one objective only: their ratio is 0 or inf, not an imbalance)
                if _DECODER_LAYER.search(name) and float(norms[s, 0]) > 0 and float(norms[s, 1]) > 0:
                    ratios.append({"step": step, "segment": name,
                                   "ratio": float(norms[s, 0] / norms[s, 1])})
        elif kind == "gradnorm":
            # each loss on its own (the grad of an element of a stack reaches every input, as zeros)
            grads = [torch.autograd.grad(losses[k], params, retain_graph=True, allow_unused=True) for k in OBJECTIVES]
            if shared is None:
                shared = [i for i in reached_by_all(grads) if i in lora]
                if not shared:
                    raise ValueError("GradNorm: no LoRA tensor is reached by every objective")
            norms = shared_norms(grads, shared)
            w = gradnorm.weights
            for p, *per_objective in zip(params, *grads):  # the gradient of Σ w_i L_i
                reached = [w[k].item() * g for k, g in enumerate(per_objective) if g is not None]
                p.grad = sum(reached) if reached else None
            gradnorm.update(norms, torch.stack([losses[k].detach() for k in OBJECTIVES]))  # next step's weights
            weights_log.append(gradnorm.weights.tolist())
            norms_log.append(norms.tolist())
        else:
            w = arm.get("image_weight", 1.0) if kind == "static" else 1.0
            (losses["text"] + w * losses["image"]).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for k in OBJECTIVES:
            curve[k].append(float(losses[k].detach()))
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == cfg["steps"]:
            evals.append({"step": step + 1, **evaluate(model, split)})
    result = {"family": family, "arm": arm, "seed": seed, "final": evals[-1],
              "curve": [{k: v for k, v in e.items() if k not in ("pictures", "targets")} for e in evals],
              "train_losses": curve, "grad_ratios": ratios, "wall_s": time.perf_counter() - started}
    if balancer is not None:
        hist = balancer.history
        result["segments"] = balancer.segment_names
        result["weights"] = [h["weights"].tolist() for h in hist]
        result["branches"] = [h["branch"].tolist() for h in hist]
        result["norms"] = [h["norms"].tolist() for h in hist]
    if kind == "gradnorm":
        result["gradnorm_shared"] = [named[i][0] for i in shared]
        result["gradnorm_weights"] = weights_log[::cfg["diag_every"]]
        result["gradnorm_norms"] = norms_log[::cfg["diag_every"]]
    return result
