"""A tiny unified text+image model (Llama decoder over text + discrete image tokens, LoRA) and
its synthetic caption <-> picture data: the small real model the training-layer tests use.
The study (`fused-balance study`, `make demo`) lives in ``fused_balance.study``."""
