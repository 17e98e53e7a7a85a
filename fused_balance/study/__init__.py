"""The study (`fused-balance study`, `make demo`): what Pareto-LoRA and the BalanceScheduler do.

- unified-model study (``unified``, ``arms``): Emu2-style (regressed visual embeddings) and
  Chameleon-style (discrete image tokens) tiny models; vanilla LoRA, static reweighting,
  GradNorm, MGDA, Pareto-LoRA and its ablations;
- encoder+LLM study (``llava``): a tiny LLaVA, constant LR vs one-sided LoRA vs the
  BalanceScheduler (first-order, KL probe, auxiliary loss);
- unified testbed (``testbed``, ``encoder``): a pretrained (cached per seed) Emu2-style model
  with a pretrained visual encoder, three instruction tasks, vanilla and unimodal LoRA
  references, and the check that accepts or rejects the testbed before any method runs;
- encoder+LLM testbed (``testbed_llava``): a tiny LLaVA trained in LLaVA's stages (encoder,
  LLM, projector alignment, instruction tuning; cached per seed), two shifts (new visual
  attributes, a new answer format), LLM-only / encoder-only / both-sided LoRA and its check;
- ``tuning`` (settings chosen on the validation split), ``stats`` (paired t-intervals), ``report``
  (generated summary, tables; ``plots``: PNGs), ``jobs`` (resumable job files), ``run`` (CLI).

transformers, peft, matplotlib and tqdm are imported inside the functions that need them.
"""

__all__ = ["add_arguments", "main"]


def __getattr__(name):
    if name in __all__:
        from fused_balance.study import run
        return getattr(run, name)
    raise AttributeError(name)
