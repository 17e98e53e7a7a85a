"""Unified text+image models of the study, built from tiny transformers configs (no download).

Two image-output families, same scenes, same sequence layout:

    generation:    <bos> <draw> caption <boi> p_1 .. p_16 <eoi> <eos>
    understanding: <bos> <describe> <boi> p_1 .. p_16 <eoi> caption <eos>

- ``chameleon``: ``ChameleonForConditionalGeneration``; a patch is a discrete image token (one
  code per palette colour, named ``IMGIMG*`` in the config's vocabulary map, as Chameleon's VQ
  codes are). Its forward sets the logits of every image token to the dtype's minimum (it only
  generates text), so the study takes the decoder's hidden states and applies ``lm_head``
  itself: the image loss is the cross-entropy of the next image token over the full vocabulary.
- ``emu2``: a Llama decoder that reads and regresses continuous visual embeddings, as Emu2 does:
  a patch enters as ``visual_in(e)`` (e: the frozen "visual encoder" embedding of its colour, a
  fixed random codebook) and the next patch's embedding is regressed from the hidden state by
  ``visual_head`` with a mean-squared-error loss; text uses cross-entropy through ``lm_head``.

Targets: the image objective is every patch of a generation example, predicted from its prefix;
the text objective is every caption token (both directions) and the closing tokens. LoRA (PEFT)
on every linear layer of the decoder; embeddings and heads are trained fully (a vocabulary that
gains image tokens needs that). Pictures are generated greedily (argmax over the image tokens, or
the nearest codebook entry to the regressed embedding), each patch fed back for the next.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fused_balance.study.data import CELLS, PALETTE, PRETRAINING, WORDS, Scene, SceneStyle

SPECIALS = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<draw>", "<describe>", "<patch>")
TEXT_OFFSET = len(SPECIALS)
IMAGE_OFFSET = TEXT_OFFSET + len(WORDS)      # chameleon: image codes follow the text vocabulary
NUM_CODES = len(PALETTE)                     # one code per palette colour (0 = background)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAMILIES = ("chameleon", "emu2")


def special(name: str) -> int:
    return SPECIALS.index(name)


def word(w: str, words: tuple = WORDS) -> int:
    return TEXT_OFFSET + words.index(w)


def encode(scenes: list[Scene], generation: list[bool], words: tuple = WORDS) -> dict:
    """Right-padded token ids [B, T] with the patch colours at the patch positions, and the masks
    of the *predicting* positions (mask[b, t]: position t predicts token t + 1); ``words``: the
    text vocabulary (the testbed's extends the study's)."""
    rows, boi = [], []
    for scene, gen in zip(scenes, generation):
        caption = [word(w, words) for w in scene.caption]
        picture = [-1 - c for c in scene.grid]  # negative: a patch, -1 - colour
        if gen:
            ids = [special("<bos>"), special("<draw>")] + caption + [special("<boi>")] + picture \
                + [special("<eoi>"), special("<eos>")]
            boi.append(2 + len(caption))
        else:
            ids = [special("<bos>"), special("<describe>"), special("<boi>")] + picture \
                + [special("<eoi>")] + caption + [special("<eos>")]
            boi.append(2)
        rows.append(ids)
    T = max(len(r) for r in rows)
    raw = torch.full((len(rows), T), special("<pad>"), dtype=torch.long)
    attention = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        raw[b, :len(r)] = torch.tensor(r)
        attention[b, :len(r)] = 1
    is_patch = raw < 0
    colours = torch.where(is_patch, -1 - raw, torch.zeros_like(raw))
    gen = torch.tensor(generation)
    nxt_patch = is_patch[:, 1:]
    image_target = nxt_patch & gen[:, None]
    # text targets: every real token after the prompt that is not a patch
    after_prompt = torch.arange(T - 1)[None, :] >= 1
    text_target = after_prompt & ~nxt_patch & (attention[:, 1:] > 0)
    text_target &= ~((raw[:, 1:] == special("<boi>")) & ~gen[:, None])  # understanding: <boi> is input
    return {"raw": raw, "is_patch": is_patch, "colours": colours, "attention_mask": attention,
            "generation": gen, "boi": torch.tensor(boi), "text_target": text_target,
            "image_target": image_target, "grid": torch.tensor([s.grid for s in scenes])}


class UnifiedModel(torch.nn.Module):
    """A tiny unified model of one family; ``hidden(batch, colours)`` -> decoder output states."""

    def __init__(self, family: str, *, hidden: int = 32, layers: int = 4, heads: int = 4,
                 visual_dim: int = 16, visual_scale: float = 1.0, seed: int = 0):
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        self.family = family
        torch.manual_seed(seed)
        common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=160,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        if family == "chameleon":
            from transformers import ChameleonConfig, ChameleonForConditionalGeneration

            vocabulary_map = {f"IMGIMG{chr(ord('A') + c)}Z": IMAGE_OFFSET + c for c in range(NUM_CODES)}
            # the VQ-VAE is never used (the scenes are tokenised in code): make it tiny
            vq = dict(embed_dim=4, num_embeddings=NUM_CODES, base_channels=32, channel_multiplier=[1],
                      num_res_blocks=1, resolution=16, latent_channels=4, attn_resolutions=[])
            config = ChameleonConfig(vocab_size=IMAGE_OFFSET + NUM_CODES, vq_config=vq,
                                     vocabulary_map=vocabulary_map, **common)
            config._attn_implementation = "eager"
            self.net = ChameleonForConditionalGeneration(config)
            self.net.model.vqmodel.requires_grad_(False)
        else:
            from transformers import LlamaConfig, LlamaModel

            config = LlamaConfig(vocab_size=IMAGE_OFFSET, **common)
            config._attn_implementation = "eager"
            self.llm = LlamaModel(config)
            self.lm_head = torch.nn.Linear(hidden, IMAGE_OFFSET, bias=False)
            self.visual_in = torch.nn.Linear(visual_dim, hidden)
            self.visual_head = torch.nn.Linear(hidden, visual_dim)
            # The frozen "visual encoder": one embedding per palette colour; unit RMS times scale.
            codebook = torch.randn(NUM_CODES, visual_dim, generator=torch.Generator().manual_seed(77))
            self.register_buffer("codebook", visual_scale * codebook / codebook.pow(2).mean(-1, keepdim=True).sqrt())

    def hidden(self, batch: dict, colours: torch.Tensor | None = None) -> torch.Tensor:
        colours = batch["colours"] if colours is None else colours
        patch = batch["is_patch"]
        if self.family == "chameleon":
            ids = torch.where(patch, IMAGE_OFFSET + colours, batch["raw"])
            return self.net.model(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
        ids = torch.where(patch, torch.full_like(colours, special("<patch>")), batch["raw"])
        embeds = self.llm.embed_tokens(ids)
        visual = self.visual_in(self.codebook[colours])
        embeds = torch.where(patch[..., None], visual, embeds)
        return self.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state

    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        head = self.net.lm_head if self.family == "chameleon" else self.lm_head
        return head(h)

    def losses(self, batch: dict) -> dict:
        """{"text": mean CE over text targets, "image": mean image loss over image targets}."""
        h = self.hidden(batch)[:, :-1]
        text_mask, image_mask = batch["text_target"], batch["image_target"]
        nxt = batch["raw"][:, 1:]
        nxt_colour = batch["colours"][:, 1:]
        text = F.cross_entropy(self.text_logits(h[text_mask]), nxt[text_mask])
        if self.family == "chameleon":  # full-vocabulary logits, image tokens not masked
            image = F.cross_entropy(self.text_logits(h[image_mask]), IMAGE_OFFSET + nxt_colour[image_mask])
        else:
            image = F.mse_loss(self.visual_head(h[image_mask]), self.codebook[nxt_colour[image_mask]])
        return {"text": text, "image": image}

    def next_colour(self, h: torch.Tensor) -> torch.Tensor:
        """The greedy colour of the next patch from hidden states [N, hidden]."""
        if self.family == "chameleon":
            return self.text_logits(h)[:, IMAGE_OFFSET:IMAGE_OFFSET + NUM_CODES].argmax(-1)
        return torch.cdist(self.visual_head(h), self.codebook).argmin(-1)

    def generate_pictures(self, batch: dict) -> torch.Tensor:
        return generate_pictures(self, batch)


@torch.no_grad()
def generate_pictures(model, batch: dict) -> torch.Tensor:
    """Greedy pictures [B, 16] for the generation rows of ``batch`` from a model with
    ``hidden(batch, colours)`` and ``next_colour(h)`` (one forward per patch; causal attention,
    so the not-yet-generated patches after the current one never matter)."""
    colours = batch["colours"].clone()
    rows = torch.arange(colours.shape[0])
    first = batch["boi"] + 1
    colours[batch["is_patch"]] = 0
    for j in range(CELLS):
        h = model.hidden(batch, colours)[rows, first + j - 1]
        colours[rows, first + j] = model.next_colour(h)
    return torch.stack([colours[b, first[b]:first[b] + CELLS] for b in range(len(rows))])


def build_lora_model(family: str, *, rank: int = 8, alpha: int = 16, seed: int = 0, **model_kwargs) -> UnifiedModel:
    """A UnifiedModel with LoRA on the decoder's linear layers; only LoRA tensors, embeddings and
    heads train (the base decoder is frozen)."""
    from peft import LoraConfig, inject_adapter_in_model

    model = UnifiedModel(family, seed=seed, **model_kwargs)
    torch.manual_seed(seed + 1)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                       target_modules=LORA_TARGETS), model)
    full = ("embed_tokens", "lm_head", "visual_in", "visual_head")
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or (any(k in name for k in full) and "vqmodel" not in name))
    return model


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def evaluate(model: UnifiedModel, split: dict) -> dict:
    """Held-out metrics: text token accuracy / loss (teacher forced, understanding examples:
    the caption of a given picture); image metrics of greedily generated pictures (generation
    examples) and the teacher-forced image loss."""
    model.eval()
    with torch.no_grad():
        und = split["understanding"]
        h = model.hidden(und)[:, :-1]
        mask = und["text_target"]
        logits = model.text_logits(h[mask])
        target = und["raw"][:, 1:][mask]
        text_acc = float((logits.argmax(-1) == target).float().mean())
        text_loss = float(F.cross_entropy(logits, target))
        gen = split["generation"]
        image_loss = float(model.losses(gen)["image"])
        pictures = model.generate_pictures(gen)
    model.train()
    from fused_balance.study.data import cell_scores

    return {"text_acc": text_acc, "text_loss": text_loss, "image_loss": image_loss,
            **cell_scores(pictures, gen["grid"]), "pictures": pictures[:8].tolist(),
            "targets": gen["grid"][:8].tolist()}


def make_split(seed: int, n: int, max_objects: int, style: SceneStyle = PRETRAINING,
               words: tuple = WORDS) -> dict:
    """n understanding + n generation examples from their own generator."""
    from fused_balance.study.data import sample_scenes

    rng = torch.Generator().manual_seed(seed)
    und, gen = sample_scenes(n, rng, max_objects, style), sample_scenes(n, rng, max_objects, style)
    return {"understanding": encode(und, [False] * n, words), "generation": encode(gen, [True] * n, words)}


def train_batch(rng: torch.Generator, batch_size: int, generation_fraction: float, max_objects: int,
                style: SceneStyle = PRETRAINING, words: tuple = WORDS) -> dict:
    from fused_balance.study.data import sample_scenes

    scenes = sample_scenes(batch_size, rng, max_objects, style)
    gen = (torch.rand(batch_size, generator=rng) < generation_fraction).tolist()
    gen[0] = True  # every batch has a picture to draw: the image objective is never empty
    return encode(scenes, gen, words)
