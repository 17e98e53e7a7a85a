"""The ``torch`` backend: plain PyTorch, per tensor, the oracle of the tests.

Written for clarity, not speed: every other backend must agree with it. Autograd comes from
PyTorch itself. The argument conventions are those documented in ``fused_balance.backends``.
"""
from __future__ import annotations

import torch

from fused_balance._dtypes import accumulate_dtype


def availability(device: torch.device) -> tuple[bool, str]:
    return True, "plain PyTorch, always available"


def gram(flat, num_objectives, segment_ids, num_segments):
    K = num_objectives
    P = len(flat) // K
    acc = accumulate_dtype(flat[0].dtype)
    device = flat[0].device
    rows = []  # one [K, K] contribution per tensor, then a segment sum (index_add is differentiable)
    for p in range(P):
        g = torch.stack([flat[k * P + p].reshape(-1).to(acc) for k in range(K)])  # [K, n_p]
        rows.append(g @ g.T)
    contributions = torch.stack(rows)  # [P, K, K]
    index = torch.tensor(segment_ids, dtype=torch.long, device=device)
    out = torch.zeros(num_segments, K, K, dtype=acc, device=device)
    return out.index_add(0, index, contributions)


def combine(flat, num_objectives, weights, segment_ids):
    K = num_objectives
    P = len(flat) // K
    acc = accumulate_dtype(flat[0].dtype)
    outs = []
    for p in range(P):
        s = segment_ids[p]
        d = sum(weights[s, k].to(acc) * flat[k * P + p].to(acc) for k in range(K))
        outs.append(d.to(flat[p].dtype))
    return outs


def combine_into(flat, num_objectives, weights, segment_ids, out, skip):
    with torch.no_grad():
        results = combine(flat, num_objectives, weights, segment_ids)
        keep = None if skip is None else skip.reshape(()).to(torch.bool)
        for o, r in zip(out, results):
            o.copy_(r if keep is None else torch.where(keep, o, r))


def balanced_adamw_(flat, num_objectives, weights, segment_ids, params, exp_avgs, exp_avg_sqs,
                    lrs, weight_decays, beta1, beta2, eps, step, skip):
    """torch.optim.AdamW's update (decoupled decay, bias correction) on the combined gradient."""
    with torch.no_grad():
        grads = combine(flat, num_objectives, weights, segment_ids)
        keep = None if skip is None else skip.reshape(()).to(torch.bool)
        bc1 = 1.0 - beta1 ** step
        bc2 = 1.0 - beta2 ** step
        for p, g, m, v, lr, wd in zip(params, grads, exp_avgs, exp_avg_sqs, lrs, weight_decays):
            acc = accumulate_dtype(p.dtype)
            p32, g32, m32, v32 = p.to(acc), g.to(acc), m.to(acc), v.to(acc)
            p_new = p32 * (1.0 - lr * wd)
            m_new = beta1 * m32 + (1.0 - beta1) * g32
            v_new = beta2 * v32 + (1.0 - beta2) * g32 * g32
            denom = (v_new / bc2).sqrt() + eps
            p_new = p_new - (lr / bc1) * m_new / denom
            for dst, new in ((p, p_new), (m, m_new), (v, v_new)):
                dst.copy_(new if keep is None else torch.where(keep, dst.to(acc), new))
