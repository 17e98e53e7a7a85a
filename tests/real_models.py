"""Tiny random instances of transformers' multimodal classes with PEFT LoRA, and the recipe for
per-modality losses of each family (the README's "Using it with your model" follows these).

Each ``Family`` holds a model builder, the LoRA target modules (the ones that exist in it), a
batch maker and ``losses(model, batch) -> {"text": ..., "image": ...}``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

VOCAB = 96  # text ids 9..63, image-token ids 64..79 where a family has them in its vocabulary
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
            attention_dropout=0.0)
IMAGE_IDS = range(64, 80)
IMAGE_TOKEN = 5  # placeholder id of an image position (LLaVA, Janus, Qwen2-VL)


def _transformers():
    import transformers
    return transformers


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B, T-1] per-position cross-entropy of predicting ids[:, 1:] from logits[:, :-1]."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction="none").view(ids.shape[0], -1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def inner(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ---------------------------------------------------------------- early fusion: Chameleon, Emu3
def mixed_ids(gen, batch: int, length: int = 12) -> torch.Tensor:
    """Text ids, then image-token ids: one interleaved sequence per row."""
    text = torch.randint(9, 64, (batch, length // 2), generator=gen)
    image = torch.randint(IMAGE_IDS.start, IMAGE_IDS.stop, (batch, length - length // 2), generator=gen)
    return torch.cat([text, image], dim=1)


def early_fusion_losses(model, batch, *, logits_fn=None):
    """One forward; text and image losses are the next-token losses at text and image-token
    targets. ``logits_fn(model, ids)`` replaces the model's logits (Chameleon, see below)."""
    ids = batch["input_ids"]
    logits = logits_fn(model, ids) if logits_fn else model(input_ids=ids).logits
    nll = next_token_nll(logits, ids)
    is_image = (ids[:, 1:] >= IMAGE_IDS.start) & (ids[:, 1:] < IMAGE_IDS.stop)
    return {"text": masked_mean(nll, ~is_image), "image": masked_mean(nll, is_image)}


def chameleon_logits(model, ids):
    """ChameleonForConditionalGeneration.forward sets the logits of every image token to the
    dtype's minimum (it generates text only), so an image loss from its logits is inf. The image
    objective takes the logits from the last hidden state and the lm_head instead."""
    m = inner(model)
    hidden = m.model(input_ids=ids).last_hidden_state
    return m.lm_head(hidden)


def build_chameleon():
    T = _transformers()
    vocabulary_map = {"<image>": IMAGE_TOKEN, **{f"IMGIMG{chr(65 + i)}Z": IMAGE_IDS.start + i for i in range(16)}}
    vq = dict(embed_dim=8, num_embeddings=16, latent_channels=32, resolution=16, base_channels=32,
              channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[8])
    return T.ChameleonForConditionalGeneration(T.ChameleonConfig(**TEXT, vq_config=vq, vocabulary_map=vocabulary_map,
                                                                 pad_token_id=0))


def build_emu3():
    T = _transformers()
    vocabulary_map = {"<image>": IMAGE_TOKEN, **{f"<|visual token {i:06d}|>": IMAGE_IDS.start + i for i in range(16)}}
    vq = dict(codebook_size=16, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 2],
              num_res_blocks=1, attn_resolutions=[1], hidden_size=8, num_attention_heads=1,
              temporal_downsample_factor=1)
    text = dict(TEXT, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return T.Emu3ForConditionalGeneration(T.Emu3Config(vq_config=vq, text_config=text, vocabulary_map=vocabulary_map))


def early_fusion_batch(gen, batch=2):
    return {"input_ids": mixed_ids(gen, batch)}


# ---------------------------------------------------------------- Janus: understanding + generation
def build_janus():
    T = _transformers()
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8,
                  projection_dim=32, mlp_ratio=2, num_image_tokens=4)
    vq = dict(embed_dim=8, num_embeddings=16, latent_channels=32, base_channels=32, channel_multiplier=[1, 2],
              num_res_blocks=1, num_patches=2, projection_dim=32, image_token_embed_dim=32, num_hidden_layers=1)
    return T.JanusForConditionalGeneration(T.JanusConfig(text_config=dict(TEXT, model_type="llama"),
                                                         vision_config=vision, vq_config=vq,
                                                         image_token_id=IMAGE_TOKEN))


def understanding_batch(gen, batch=2, image_tokens=4, text=8, channels=3, size=16):
    """A prompt with ``image_tokens`` placeholders then text: the text after the image is the
    target of the text objective."""
    ids = torch.cat([torch.full((batch, image_tokens), IMAGE_TOKEN), torch.randint(9, 64, (batch, text), generator=gen)], 1)
    return {"input_ids": ids, "pixel_values": torch.randn(batch, channels, size, size, generator=gen)}


def janus_batch(gen, batch=2):
    out = understanding_batch(gen, batch)
    out["image_ids"] = torch.randint(0, 16, (batch, 6), generator=gen)  # VQ codes to generate
    return out


def janus_losses(model, batch):
    """Text: understanding (the image through vision_model + aligner, the caption's next-token
    loss). Image: generation, a second forward (VQ codes -> generation_embeddings ->
    generation_aligner -> language model -> generation_head, next-code loss)."""
    m = inner(model)
    ids = batch["input_ids"]
    logits = model(input_ids=ids, pixel_values=batch["pixel_values"]).logits
    text = masked_mean(next_token_nll(logits, ids), ids[:, 1:] != IMAGE_TOKEN)
    codes = batch["image_ids"]
    embeds = m.prepare_embeddings_for_image_generation(codes)
    hidden = m.model.language_model(inputs_embeds=embeds).last_hidden_state
    image = next_token_nll(m.model.generation_head(hidden), codes).mean()
    return {"text": text, "image": image}


# ---------------------------------------------------------------- LLaVA, Qwen2-VL: understanding
def build_llava():
    T = _transformers()
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=16, patch_size=8, projection_dim=32)
    return T.LlavaForConditionalGeneration(T.LlavaConfig(vision_config=vision, text_config=dict(TEXT, model_type="llama"),
                                                         image_token_index=IMAGE_TOKEN, image_seq_length=4,
                                                         vision_feature_layer=-1))


def build_qwen2_vl():
    T = _transformers()
    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=1, in_channels=3)
    text = dict(TEXT, rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 10000.0},
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return T.Qwen2VLForConditionalGeneration(T.Qwen2VLConfig(text_config=text, vision_config=vision,
                                                             image_token_id=IMAGE_TOKEN, video_token_id=6,
                                                             vision_start_token_id=7, vision_end_token_id=8))


def llava_batch(gen, batch=2):
    out = understanding_batch(gen, batch)
    out["text_ids"] = torch.randint(9, 64, (batch, 10), generator=gen)
    return out


def qwen2_vl_batch(gen, batch=2):
    # One 16x16 image per row: a 4x4 grid of 4x4 patches, merged 2x2 into 4 image tokens.
    ids = torch.cat([torch.full((batch, 1), 7), torch.full((batch, 4), IMAGE_TOKEN), torch.full((batch, 1), 8),
                     torch.randint(9, 64, (batch, 8), generator=gen)], 1)
    return {"input_ids": ids, "pixel_values": torch.randn(batch * 16, 3 * 4 * 4, generator=gen),
            "image_grid_thw": torch.tensor([[1, 4, 4]] * batch),
            "mm_token_type_ids": (ids == IMAGE_TOKEN).int(),  # 1: image position (for M-RoPE)
            "text_ids": torch.randint(9, 64, (batch, 10), generator=gen)}


def understanding_losses(model, batch):
    """Separate forwards: "image" = the caption loss of an image-grounded sequence (reaches the
    vision tower and projector), "text" = a text-only sequence (language model only)."""
    ids = batch["input_ids"]
    extra = {k: batch[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids") if k in batch}
    logits = model(input_ids=ids, **extra).logits
    target = (ids[:, 1:] >= 9)  # the caption, not the placeholders or vision markers
    image = masked_mean(next_token_nll(logits, ids), target)
    text_ids = batch["text_ids"]
    text = next_token_nll(model(input_ids=text_ids).logits, text_ids).mean()
    return {"text": text, "image": image}


@dataclasses.dataclass
class Family:
    name: str
    class_name: str
    build: Callable
    targets: list  # LoRA target modules that exist in this class
    batch: Callable
    losses: Callable
    # (module path, segment) pairs that must be segments of their own
    expect_segments: list


FAMILIES = [
    Family("chameleon", "ChameleonForConditionalGeneration", build_chameleon, ["q_proj", "v_proj", "q", "v", "lm_head"],
           early_fusion_batch, lambda m, b: early_fusion_losses(m, b, logits_fn=chameleon_logits),
           ["model.layers.0", "model.layers.1", "lm_head", "model.vqmodel.encoder.down.1"]),
    Family("emu3", "Emu3ForConditionalGeneration", build_emu3, ["q_proj", "v_proj", "lm_head"],
           early_fusion_batch, early_fusion_losses,
           ["model.text_model.layers.0", "model.vqmodel.encoder.down_block.down.1",
            "model.vqmodel.decoder.up_block.up.1", "lm_head"]),
    Family("janus", "JanusForConditionalGeneration", build_janus,
           ["q_proj", "v_proj", "fc1", "hidden_layers.0", "lm_head", "vision_head"],
           janus_batch, janus_losses,
           ["model.vision_model.encoder.layers.0", "model.language_model.layers.0", "model.aligner",
            "model.generation_aligner", "model.generation_head", "lm_head"]),
    Family("llava", "LlavaForConditionalGeneration", build_llava, ["q_proj", "v_proj", "linear_1", "linear_2"],
           llava_batch, understanding_losses,
           ["model.vision_tower.encoder.layers.0", "model.multi_modal_projector", "model.language_model.layers.0"]),
    Family("qwen2_vl", "Qwen2VLForConditionalGeneration", build_qwen2_vl, ["q_proj", "v_proj", "qkv", "mlp.0"],
           qwen2_vl_batch, understanding_losses,
           ["model.visual.blocks.0", "model.visual.merger", "model.language_model.layers.0"]),
]


def lora_model(family: Family, *, seed: int = 0, dtype=torch.float32, rank: int = 2):
    """The family's tiny model with LoRA on its targets; lora_B given values (it starts at zero,
    which would leave lora_A without gradient at the first step)."""
    import peft

    torch.manual_seed(seed)
    model = family.build()
    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=4, target_modules=family.targets,
                                                       lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.to(dtype).eval()
