"""Training arms of the unified-model study: the same model init, batches and steps for each.

- ``vanilla``: AdamW on the plain sum text + image (every ``diag_every`` steps the two
  objectives' per-layer gradient norms are observed through a ``policy="sum"`` ParetoLoRA,
  whose combination is exactly the sum's gradient).
- ``static``: AdamW on text + w·image with w tuned on the validation split (see run.py).
- ``gradnorm``: GradNorm (Chen et al., 2018) on the last decoder layer's LoRA tensors (the
  shared layer W): loss Σ w_i L_i, G_i = w_i |∇_W L_i|, target Ḡ · r_i^α with
  r_i = (L_i/L_i(0)) / mean_j(L_j/L_j(0)); w moves down the gradient of Σ_i |G_i − target_i|
  (target held constant, as in the paper), then is renormalised to Σ w_i = 2. Because
  G_i = w_i |∇_W L_i| with w_i > 0, that gradient is sign(G_i − target_i) |∇_W L_i|: no second
  backward pass is needed.
- ``mgda``: ParetoLoRA(policy="mgda") per layer (min-norm point every step).
- ``pareto``: ParetoLoRA(policy="pareto_lora", tau, segments) — the method under study.

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
    G_i = w_i |∇_W L_i| is linear in w_i, so the gradient is sign(G_i − target_i) |∇_W L_i|."""
    G = weights * shared_norms
    ratio = (losses / initial_losses) / (losses / initial_losses).mean()
    target = G.mean() * ratio.pow(alpha)
    return torch.sign(G - target) * shared_norms


def _segments(arm: dict, cfg: dict):
    seg = arm.get("segments", "layer")
    return layer_group_segments(cfg["layers"], 2) if seg == "group" else seg


def train_unified(family: str, arm: dict, seed: int, cfg: dict, split: dict) -> dict:
    """One run; returns metrics on ``split`` (a make_split dict) every eval_every steps."""
    from fused_balance.study.unified import build_lora_model, evaluate, train_batch, trainable
    from fused_balance.study.data import TRAIN_SEED_BASE
    from fused_balance.training import ParetoLoRA, layer_key

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
                              objectives=list(OBJECTIVES), history_every=cfg["diag_every"])
    elif kind == "vanilla":
        observer = ParetoLoRA(named, None, policy="sum", segments="layer", objectives=list(OBJECTIVES))
    elif kind == "gradnorm":
        last = f"layers.{cfg['layers'] - 1}"
        shared = [p for n, p in named if layer_key(n).endswith(last)]
        task_weights = torch.ones(2, requires_grad=True)
        weight_opt = torch.optim.Adam([task_weights], lr=cfg["gradnorm_lr"])
        initial = None
    rng = torch.Generator().manual_seed(TRAIN_SEED_BASE + seed)  # same batches in every arm
    curve, evals, ratios, weights_log = {k: [] for k in OBJECTIVES}, [], [], []
    for step in range(cfg["steps"]):
        batch = train_batch(rng, cfg["batch_size"], cfg["generation_fraction"], cfg["max_objects"])
        losses = model.losses(batch)
        if balancer is not None:  # backward + clip + step, like every arm (clipping for all)
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
            L = torch.stack([losses[k] for k in OBJECTIVES])
            if initial is None:
                initial = L.detach().clone()
            shared_norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in torch.autograd.grad(
                L[i], shared, retain_graph=True))) for i in range(2)])
            (task_weights.detach() * L).sum().backward()
            torch.nn.utils.clip_grad_norm_(params, cfg["clip"])
            optimizer.step()
            task_weights.grad = gradnorm_weight_grad(task_weights.detach(), shared_norms, L.detach(),
                                                     initial, cfg["gradnorm_alpha"])
            weight_opt.step()
            with torch.no_grad():
                task_weights.clamp_(min=1e-3)
                task_weights.mul_(2.0 / task_weights.sum())
            weights_log.append(task_weights.detach().tolist())
        else:
            w = arm.get("image_weight", 1.0) if kind == "static" else 1.0
            (losses["text"] + w * losses["image"]).backward()
        if kind != "gradnorm":
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
        result["gradnorm_weights"] = weights_log[::cfg["diag_every"]]
    return result
