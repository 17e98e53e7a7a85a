"""Encoder+LLM study of the BalanceScheduler (after CoMMIT) on a tiny LLaVA.

``LlavaForConditionalGeneration`` from tiny configs (no download): a CLIP vision tower (32x32
pictures, 8x8 patches -> 16 image tokens), the two-layer projector, a Llama decoder. LoRA on the
vision tower's and the LLM's linear layers. Both towers start from random weights (nothing is
pre-trained here), so this is a stand-in for the paper's setting, not a reproduction.

Task: a rendered scene (pixels, with a little noise) and a question -> a one-word answer:
"what colour is in the top left ?" (a colour or "nothing"), "what shape is in the ... ?",
"how many shapes ?". Accuracy: argmax of the answer token on the held-out test split.

Components balanced by the scheduler: ``encoder`` = the vision tower's LoRA tensors; ``llm`` =
the LLM's LoRA tensors plus the projector, the token embeddings and the head (every trainable
tensor is in exactly one component; BalanceScheduler is given explicit parameter lists).

Arms (same init, batches, steps, base learning rate): ``constant`` (AdamW, both sides),
``llm_only`` (vision LoRA frozen), ``encoder_only`` (LLM LoRA frozen; projector, embeddings and
head still train: without them nothing maps pictures to answers), ``sched_first``
(BalanceScheduler, first-order contributions), ``sched_exact`` (KL probe every ``exact_every``
steps), ``sched_aux`` (first-order + the auxiliary entropy loss); ``feature_cd`` and
``language_cd``: *our reading* of CoMMIT's one-sided baselines (Feature-CD / Language-CD; the
paper's exact definitions are not available to us): alternating phases of ``cd_phase`` steps in
which only one side's LoRA is updated, the encoder's first (``feature_cd``) or the LLM's first
(``language_cd``); see ``cd_side`` and ``train_llava``.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from fused_balance.study.data import COLOURS, COUNTS, PLACES, SHAPES, WORDS, Scene, render

SPECIALS = ("<pad>", "<bos>", "<eos>", "<image>")
QUESTION_WORDS = ("what", "colour", "how", "many", "?")
VOCAB = SPECIALS + tuple(sorted(set(WORDS) | set(QUESTION_WORDS)))
IMAGE_TOKENS = 16
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj",
                "down_proj", "fc1", "fc2"]
BRIDGE = ("multi_modal_projector", "embed_tokens", "lm_head")  # trained in every arm
CD_FIRST = {"feature_cd": "encoder", "language_cd": "llm"}  # the side each alternating arm tunes first
ARMS = ("constant", "llm_only", "encoder_only", "sched_first", "sched_exact", "sched_aux", *CD_FIRST)


def tok(w: str) -> int:
    return VOCAB.index(w)


def question(scene: Scene, rng: torch.Generator) -> tuple[list[str], str]:
    kind = int(torch.randint(3, (1,), generator=rng))
    if kind == 2:
        return ["how", "many", "shapes", "?"], COUNTS[len(scene.objects) - 1]
    occupied = [o[2] for o in scene.objects]
    if float(torch.rand((), generator=rng)) < 0.75:  # mostly about a shape, so "nothing" is rare
        place = occupied[int(torch.randint(len(occupied), (1,), generator=rng))]
    else:
        place = list(PLACES)[int(torch.randint(len(PLACES), (1,), generator=rng))]
    found = [o for o in scene.objects if o[2] == place]
    if kind == 0:
        return ["what", "colour", "is", "in", "the", *place.split(), "?"], found[0][0] if found else "nothing"
    return ["what", "shape", "is", "in", "the", *place.split(), "?"], found[0][1] if found else "nothing"


def pixel_values(scenes, rng: torch.Generator, noise: float = 0.05, tint: torch.Tensor | None = None) -> torch.Tensor:
    """The scenes rendered, with Gaussian pixel noise, normalised to [-1, 1]: [N, 3, 32, 32].
    ``tint`` [N, 16, 3]: an RGB offset per cell, added to the palette's colour."""
    pixels = render(torch.tensor([s.grid for s in scenes]))
    if tint is not None:
        pixels = pixels + tint.movedim(-1, -2).reshape(-1, 3, 4, 4).repeat_interleave(8, -2).repeat_interleave(8, -1)
    pixels = (pixels + noise * torch.randn(pixels.shape, generator=rng)).clamp(0, 1)
    return (pixels - 0.5) / 0.5


def make_batch(n: int, rng: torch.Generator, max_objects: int, noise: float = 0.05) -> dict:
    from fused_balance.study.data import sample_scenes

    scenes = sample_scenes(n, rng, max_objects)
    qa = [question(s, rng) for s in scenes]
    T = 1 + IMAGE_TOKENS + max(len(q) for q, _ in qa)
    ids = torch.full((n, T), tok("<pad>"), dtype=torch.long)
    attention = torch.zeros(n, T, dtype=torch.long)
    answer_pos = torch.zeros(n, dtype=torch.long)
    for b, (q, _) in enumerate(qa):  # left-padded, so every answer is predicted at the last position
        row = [tok("<bos>")] + [tok("<image>")] * IMAGE_TOKENS + [tok(w) for w in q]
        ids[b, T - len(row):] = torch.tensor(row)
        attention[b, T - len(row):] = 1
        answer_pos[b] = T - 1
    return {"input_ids": ids, "attention_mask": attention, "pixel_values": pixel_values(scenes, rng, noise),
            "answer": torch.tensor([tok(a) for _, a in qa]), "answer_pos": answer_pos}


def build_model(seed: int, *, hidden: int = 32, layers: int = 2, rank: int | None = 8, vocab: tuple = VOCAB,
                patch_size: int = 8):
    """The tiny LLaVA (random towers), with LoRA of ``rank`` on ``LORA_TARGETS`` and the bridge
    (projector, token embeddings, head) trainable; ``rank=None``: no LoRA, everything trainable.
    ``patch_size`` 8: one image token per cell (16), 16: one per quadrant (4)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=4, image_size=32, patch_size=patch_size)
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab.index("<image>"),
                         projector_hidden_act="gelu", vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(config)
    return model if rank is None else add_lora(model, seed, rank)


def add_lora(model, seed: int, rank: int):
    """LoRA of ``rank`` on ``LORA_TARGETS`` of both towers; trainable: LoRA and the bridge
    (projector, token embeddings, head)."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed + 1)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                       target_modules=LORA_TARGETS), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or any(k in name for k in BRIDGE))
    return model


def components(model) -> dict[str, list]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return {"encoder": [p for n, p in named if "vision_tower" in n],
            "llm": [p for n, p in named if "vision_tower" not in n]}


def one_sided(model, arm: str) -> dict[str, list]:
    """The trainable components after ``arm``: "llm_only" freezes the vision tower's LoRA,
    "encoder_only" the LLM's (the bridge trains in every arm); any other arm changes nothing."""
    frozen = {"llm_only": "encoder", "encoder_only": "llm"}.get(arm)
    comps = components(model)
    if frozen is not None:
        for n, p in model.named_parameters():
            side = "encoder" if "vision_tower" in n else "llm"
            if side == frozen and "lora_" in n and not any(k in n for k in BRIDGE):
                p.requires_grad_(False)
        comps = {k: [p for p in v if p.requires_grad] for k, v in comps.items()}
    return comps


def cd_side(arm: str, step: int, cd_phase: int) -> str:
    """The side ("encoder" or "llm") whose LoRA an alternating arm updates at ``step`` (from 0):
    phases of ``cd_phase`` steps, the first on ``CD_FIRST[arm]``, then alternating (feature_cd:
    encoder, llm, encoder, ...; language_cd: llm, encoder, llm, ...)."""
    if cd_phase < 1:
        raise ValueError(f"cd_phase must be at least 1, not {cd_phase}")
    first = CD_FIRST[arm]
    other = "llm" if first == "encoder" else "encoder"
    return first if (step // cd_phase) % 2 == 0 else other


def lora_sides(model) -> dict[str, list]:
    """The trainable LoRA tensors per side ("encoder": the vision tower's, "llm": the rest),
    the bridge (projector, embeddings, head) excluded."""
    sides = {"encoder": [], "llm": []}
    for n, p in model.named_parameters():
        if p.requires_grad and "lora_" in n and not any(k in n for k in BRIDGE):
            sides["encoder" if "vision_tower" in n else "llm"].append(p)
    return sides


def answer_logits(model, batch: dict) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"], logits_to_keep=1)
    return out.logits[:, -1]


@torch.no_grad()
def accuracy(model, batch: dict) -> tuple[float, float]:
    model.eval()
    logits = answer_logits(model, batch)
    model.train()
    return (float((logits.argmax(-1) == batch["answer"]).float().mean()),
            float(F.cross_entropy(logits, batch["answer"])))


def train_llava(arm: str, seed: int, cfg: dict, test: dict, *, on_step=None) -> dict:
    """One arm on one seed: ``cfg["steps"]`` AdamW steps, test accuracy every ``eval_every``.

    ``feature_cd`` / ``language_cd`` (our reading of CoMMIT's Feature-CD / Language-CD) are
    ``constant`` in everything (one AdamW over the same trainable tensors, same lr, init and
    batches, both sides' gradients computed) except that at every step the LoRA tensors of the
    side ``cd_side`` does not name get ``.grad = None`` before ``optimizer.step()``. AdamW skips a
    tensor without a gradient entirely, so in a phase the inactive side's LoRA tensors do not
    change at all: no update, no weight decay, no moment decay, and their per-tensor step count
    (hence bias correction) advances only in their own phases. The bridge (projector, token
    embeddings, head) steps in every phase. The result adds ``phases``: the side stepped at each
    step. ``on_step(step, model, optimizer)``, if given, is called after every optimizer step (tests)."""
    from fused_balance.study.data import TRAIN_SEED_BASE
    from fused_balance.training import BalanceScheduler

    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose one of {ARMS}")
    started = time.perf_counter()
    model = build_model(seed, hidden=cfg["hidden"], layers=cfg["layers"], rank=cfg["rank"])
    comps = one_sided(model, arm)
    scheduler = None
    if arm.startswith("sched"):
        optimizer = torch.optim.AdamW(BalanceScheduler.param_groups(comps, lr=cfg["lr"]), weight_decay=0.0)
        probe = make_batch(cfg["probe_size"], torch.Generator().manual_seed(555), cfg["max_objects"])
        exact = dict(exact_every=cfg["exact_every"], probe_fn=lambda: answer_logits(model, probe)) \
            if arm == "sched_exact" else {}
        scheduler = BalanceScheduler(optimizer, comps, aux_weight=cfg["aux_weight"] if arm == "sched_aux" else 0.0,
                                     **exact)
    else:
        params = [p for v in comps.values() for p in v]
        optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    inactive = None  # alternating arms: the side stepped -> the LoRA tensors that must not move
    if arm in CD_FIRST:
        sides = lora_sides(model)
        inactive = {"encoder": sides["llm"], "llm": sides["encoder"]}
    rng = torch.Generator().manual_seed(TRAIN_SEED_BASE + seed)
    evals, train_loss, phases = [], [], []
    for step in range(cfg["steps"]):
        batch = make_batch(cfg["batch_size"], rng, cfg["max_objects"])
        logits = answer_logits(model, batch)
        loss = F.cross_entropy(logits, batch["answer"])
        if scheduler is not None and scheduler.aux_weight > 0:
            loss = loss + scheduler.auxiliary_loss(logits)
        loss.backward()
        if inactive is not None:
            phases.append(cd_side(arm, step, cfg["cd_phase"]))
            for p in inactive[phases[-1]]:
                p.grad = None  # AdamW skips it: not even its moments or weight decay move
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step, model, optimizer)
        train_loss.append(float(loss.detach()))
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == cfg["steps"]:
            acc, test_loss = accuracy(model, test)
            evals.append({"step": step + 1, "acc": acc, "loss": test_loss})
    result = {"arm": arm, "seed": seed, "final": evals[-1], "curve": evals, "train_loss": train_loss,
              "wall_s": time.perf_counter() - started}
    if inactive is not None:
        result["phases"] = phases
    if scheduler is not None:
        result["kappa"] = [h["kappa"] for h in scheduler.history]
        result["multipliers"] = [h["multipliers"] for h in scheduler.history]
        result["sources"] = [h["source"] for h in scheduler.history]
        scheduler.close()
    return result
