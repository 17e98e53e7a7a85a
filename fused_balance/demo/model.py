"""The demo's tiny unified multimodal model: a Llama decoder over text tokens + image tokens
(Chameleon-style early fusion: an image is a grid of discrete codes in the same sequence),
with LoRA adapters (PEFT) on every linear layer of the decoder."""
from __future__ import annotations

import torch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base_model(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                     max_positions: int = 128, seed: int = 0):
    """A randomly initialised LlamaForCausalLM from a config (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=max_positions,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         attn_implementation="eager")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def build_lora_model(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                     rank: int = 8, alpha: int = 16, train_embeddings: bool = True,
                     max_positions: int = 128, seed: int = 0):
    """The base model wrapped with LoRA on all linear layers of the decoder. The embedding
    table and the output head are trained too (``modules_to_save``), as they must be when a
    vocabulary gains image tokens."""
    from peft import LoraConfig, get_peft_model

    base = build_base_model(vocab_size, hidden=hidden, layers=layers, heads=heads,
                            max_positions=max_positions, seed=seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                        modules_to_save=["embed_tokens", "lm_head"] if train_embeddings else None,
                        init_lora_weights=True)
    torch.manual_seed(seed + 1)
    return get_peft_model(base, config)


def modality_losses(model, batch: dict, *, text_weight: float = 1.0) -> tuple[dict, torch.Tensor]:
    """({"text": L_text, "image": L_image}, logits). Each objective sums the cross-entropy of its
    target tokens and divides by the number of all target tokens, so L_text + L_image is the
    usual token-mean LM loss (``text_weight`` scales the text part)."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels_next"]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                          reduction="none").view_as(labels)
    count = (batch["text_mask"] | batch["image_mask"]).sum().clamp(min=1)
    text = (nll * batch["text_mask"]).sum() / count
    image = (nll * batch["image_mask"]).sum() / count
    return {"text": text_weight * text, "image": image}, logits
