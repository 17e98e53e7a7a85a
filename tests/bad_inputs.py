"""Bad inputs for the op layer, shared by the robustness tests (the public API raises before
anything changes) and the list-check tests (the C++ screens raise exactly what Python does)."""
from __future__ import annotations

import torch

from shared import random_grads


def adamw_state(shapes, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    m = [torch.randn(s, generator=gen).to(dtype) * 0.1 for s in shapes]
    v = [torch.rand(s, generator=gen).to(dtype) * 0.1 for s in shapes]
    return params, m, v


def two_by_two():
    return random_grads(2, [(3,), (3,)], seed=0)


def meta(shape=(3,)):
    return torch.empty(shape, device="meta")


GRAM_CASES = {
    "not a sequence": (lambda g: 5, TypeError, "grads must be a sequence"),
    "objective is a tensor": (lambda g: [g[0], torch.randn(3)], TypeError, r"grads\[1\] must be a sequence"),
    "None gradient": (lambda g: [g[0], [g[1][0], None]], TypeError, r"grads\[1\]\[1\] is NoneType"),
    "complex dtype": (lambda g: [[t.to(torch.complex64) for t in r] for r in g], TypeError, r"grads\[0\]\[0\] has dtype"),
    "mixed dtype": (lambda g: [g[0], [g[1][0], g[1][1].double()]], TypeError, r"grads\[1\]\[1\] has dtype"),
    "meta device": (lambda g: [g[0], [g[1][0], meta()]], ValueError, r"grads\[1\]\[1\] is on meta"),
    "sparse": (lambda g: [g[0], [g[1][0], g[1][1].to_sparse()]], TypeError, r"grads\[1\]\[1\] has layout"),
    "shape": (lambda g: [g[0], [g[1][0], torch.randn(4)]], ValueError, r"grads\[1\]\[1\] has shape"),
    "count": (lambda g: [g[0], g[1][:1]], ValueError, r"grads\[1\] has 1 tensors"),
}


def adamw_case(case):
    """(args dict for balanced_adamw_step, expected exception, message regex)."""
    g = two_by_two()
    params, m, v = adamw_state([(3,), (3,)], 0)
    a = dict(grads=g, weights=torch.ones(1, 2), segments=None, params=params, exp_avgs=m, exp_avg_sqs=v,
             lrs=[1e-2, 1e-2], weight_decays=0.0, beta1=0.9, beta2=0.999, eps=1e-8, step=1, skip=None)
    E, T = ValueError, TypeError
    table = {
        "params twice": (dict(params=[params[0], params[0]]), E, r"params\[1\] shares memory with params\[0\]"),
        "m is a param": (dict(exp_avgs=[params[0], m[1]]), E, r"exp_avgs\[0\] shares memory with params\[0\]|params\[0\] shares memory with exp_avgs\[0\]"),
        "v aliases a gradient": (dict(exp_avg_sqs=[v[0], g[0][1]]), E, r"shares memory with grads\[0\]\[1\]|grads\[0\]\[1\] shares memory"),
        "param view overlap": (dict(params=[torch.zeros(4)[:3], params[1]]), None, None),  # distinct: fine
        "params dtype": (dict(params=[params[0], params[1].double()]), T, r"params\[1\] has dtype"),
        "params shape": (dict(params=[torch.zeros(4), params[1]]), E, r"params\[0\] has shape"),
        "exp_avgs meta": (dict(exp_avgs=[m[0], meta()]), E, r"exp_avgs\[1\] is on meta"),
        "exp_avg_sqs count": (dict(exp_avg_sqs=v[:1]), E, "exp_avg_sqs has 1 tensors"),
        "lrs string": (dict(lrs="0.1"), T, "lrs must be a float or a sequence"),
        "lrs item string": (dict(lrs=[0.1, "0.1"]), T, r"lrs\[1\] must be a real number"),
        "lrs tensor": (dict(lrs=torch.tensor(0.1)), T, "lrs must be a float"),
        "lrs bool": (dict(lrs=True), T, "lrs must be a float"),
        "lrs count": (dict(lrs=[0.1]), E, "lrs has 1 values, expected one per tensor"),
        "lrs nan": (dict(lrs=[0.1, float("nan")]), E, r"lrs\[1\] must be finite"),
        "lrs negative": (dict(lrs=-1e-3), E, "lrs must be >= 0"),
        "weight_decays None": (dict(weight_decays=[0.0, None]), T, r"weight_decays\[1\] must be a real number"),
        "beta1 one": (dict(beta1=1.0), E, "beta1 must be < 1"),
        "beta2 string": (dict(beta2="0.9"), T, "beta2 must be a real number"),
        "eps zero": (dict(eps=0.0), E, "eps must be > 0"),
        "step zero": (dict(step=0), E, "step must be an int >= 1"),
        "step float": (dict(step=1.0), E, "step must be an int >= 1"),
        "skip float": (dict(skip=torch.zeros(1)), T, "skip must be a bool tensor"),
        "skip two": (dict(skip=torch.zeros(2, dtype=torch.bool)), T, "skip must be None or a one-element"),
        "skip meta": (dict(skip=torch.zeros((), dtype=torch.bool, device="meta")), E, "skip is on meta"),
        "weights K": (dict(weights=torch.ones(1, 3)), E, r"weights has shape \(1, 3\), expected \[S=1, K=2\]"),
        "weights meta": (dict(weights=meta((1, 2))), E, "weights is on meta"),
        "segments": (dict(segments=[0, 2]), E, "segment 1 has no tensor"),
    }
    update, exc, match = table[case]
    a.update(update)
    return a, exc, match


ADAMW_CASES = ["params twice", "m is a param", "v aliases a gradient", "param view overlap", "params dtype",
               "params shape", "exp_avgs meta", "exp_avg_sqs count", "lrs string", "lrs item string", "lrs tensor",
               "lrs bool", "lrs count", "lrs nan", "lrs negative", "weight_decays None", "beta1 one",
               "beta2 string", "eps zero", "step zero", "step float", "skip float", "skip two", "skip meta",
               "weights K", "weights meta", "segments"]
