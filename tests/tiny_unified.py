"""The tests' tiny unified text+image model and its data, made in code (a fixture, not library code).

Data: the study's synthetic scenes (``fused_balance.study.data.sample_scene``: a 4x4 grid holding
coloured 2x2 shapes, and a caption in one of several phrasings), tokenised Chameleon-style: each
cell becomes one discrete image token naming its position and colour (16 x 7 codes), next to the
caption's words. Two directions, as in instruction tuning of a unified model:
- generation:    <bos> <draw> caption <boi> 16 image codes <eoi> <eos>
- understanding: <bos> <describe> <boi> 16 image codes <eoi> caption <eos>
Targets are every next token except the input picture of the understanding direction; text
targets outnumber image targets, so with the usual token-mean loss the text objective dominates.

Model: a randomly initialised LlamaForCausalLM from a config (no download) with PEFT LoRA on
every linear layer of the decoder; embeddings and head trained too (``modules_to_save``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fused_balance.study.data import CELLS, COLOURS, WORDS, sample_scene

SPECIALS = ["<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<draw>", "<describe>"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Vocab:
    """Token ids: specials, then text words, then image codes (patch position x colour)."""

    words: tuple = WORDS

    @property
    def text_offset(self) -> int:
        return len(SPECIALS)

    @property
    def image_offset(self) -> int:
        return len(SPECIALS) + len(self.words)

    @property
    def text_size(self) -> int:
        """Special tokens and words."""
        return self.image_offset

    @property
    def num_image_codes(self) -> int:
        return CELLS * (1 + len(COLOURS))

    def image_code(self, cell: int, colour: int) -> int:
        """Token of patch ``cell`` (row-major) with colour index ``colour`` (0 = background)."""
        return self.image_offset + cell * (1 + len(COLOURS)) + colour

    def is_background(self, ids: torch.Tensor) -> torch.Tensor:
        return self.is_image(ids) & ((ids - self.image_offset) % (1 + len(COLOURS)) == 0)

    @property
    def size(self) -> int:
        return self.image_offset + self.num_image_codes

    def special(self, name: str) -> int:
        return SPECIALS.index(name)

    def word(self, w: str) -> int:
        return self.text_offset + self.words.index(w)

    def is_image(self, ids: torch.Tensor) -> torch.Tensor:
        return ids >= self.image_offset


VOCAB = Vocab()


def sample_example(rng: torch.Generator, generation: bool, max_objects: int = 1) -> tuple[list[int], list[int]]:
    """(token ids, target mask: 1 where the token is predicted from its prefix)."""
    scene = sample_scene(rng, max_objects)
    v = VOCAB
    caption = [v.word(w) for w in scene.caption]
    picture = [v.image_code(cell, colour) for cell, colour in enumerate(scene.grid)]
    if generation:
        ids = [v.special("<bos>"), v.special("<draw>")] + caption + [v.special("<boi>")] + picture \
            + [v.special("<eoi>"), v.special("<eos>")]
        target = [0, 0] + [1] * (len(caption) + 1 + len(picture) + 2)
    else:
        ids = [v.special("<bos>"), v.special("<describe>"), v.special("<boi>")] + picture \
            + [v.special("<eoi>")] + caption + [v.special("<eos>")]
        target = [0, 0, 0] + [0] * len(picture) + [0] + [1] * (len(caption) + 1)
    return ids, target


def make_batch(batch_size: int, rng: torch.Generator, generation_fraction: float = 0.5,
               max_objects: int = 1) -> dict:
    """input_ids [B, T] (right-padded), and the masks of text and image targets at the
    *predicted* positions: text_mask[b, t] means logits[b, t] predict a text token ids[b, t+1]."""
    rows = []
    for _ in range(batch_size):
        generation = float(torch.rand((), generator=rng)) < generation_fraction
        rows.append(sample_example(rng, generation, max_objects))
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros(batch_size, T, dtype=torch.long)
    target = torch.zeros(batch_size, T, dtype=torch.bool)
    attention = torch.zeros(batch_size, T, dtype=torch.long)
    for b, (ids, tgt) in enumerate(rows):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        target[b, :len(ids)] = torch.tensor(tgt, dtype=torch.bool)
        attention[b, :len(ids)] = 1
    next_ids = input_ids[:, 1:]
    predicted = target[:, 1:]
    image = predicted & VOCAB.is_image(next_ids)
    return {"input_ids": input_ids, "attention_mask": attention, "labels_next": next_ids,
            "text_mask": predicted & ~image, "image_mask": image,
            "image_fg_mask": image & ~VOCAB.is_background(next_ids)}


def make_split(num_examples: int, seed: int, batch_size: int = 64,
               generation_fraction: float = 0.5, max_objects: int = 1) -> list[dict]:
    """A fixed held-out set (its own seed), as batches; both directions equally by default."""
    rng = torch.Generator().manual_seed(seed)
    batches, left = [], num_examples
    while left > 0:
        n = min(batch_size, left)
        batches.append(make_batch(n, rng, generation_fraction, max_objects))
        left -= n
    return batches


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
