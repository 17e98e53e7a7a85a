"""The encoder+LLM testbed (issue 21, 1b), judged before any method runs.

A tiny LLaVA (``llava.build_model``: a CLIP vision tower over 32x32 pictures cut into 16x16
patches, one image token per quadrant; the two-layer projector; a Llama decoder), made in code
and trained in LLaVA's order per seed, cached under ``<out>/cache/testbed_llava/seed<k>/``:

1. *encoder*: the vision tower alone on attribute classification of pretraining scenes (each
   quadrant's colour and shape, read from its patch token; the heads are then dropped);
2. *LLM*: the language model alone on text, the captions of pretraining scenes;
3. *alignment* (LLaVA stage 1): only the projector, captioning pictures;
4. *instruction* (LLaVA stage 2): projector and LLM on questions about pictures ("what colour /
   shape is in the <place> ?", "how many shapes ?"), one-word answers; the encoder stays frozen.

Then four shifts, LoRA fine-tuning from the stage-4 model (same seeds, batches and steps in every
arm):

- ``new_shapes`` (new visual attributes, meant to need the encoder): "what shape is in the
  <place> ?" about pictures of held-out shapes (``data.HELD_OUT_SHAPES``, names never seen);
- ``tint`` (an attribute the encoder was taught to ignore): every quadrant's colours are drawn
  warm or cool (an RGB offset) at random in every stage, a nuisance for the encoder's colour and
  shape labels; the shift asks "what tint is in the <place> ?" -> "warm" / "cool" / "nothing";
- ``new_format`` (meant to need the LLM): pictures like pretraining, a new question and a
  two-word answer ("what is in the <place> ?" -> "<colour> <shape>", or "nothing");
- ``tint_and_shape`` (meant to need both): the new question with the ignored attribute in the
  answer ("what is in the <place> ?" -> "<tint> <shape>", or "nothing").

Arms: ``both`` (LoRA on both towers), ``llm_only`` and ``encoder_only`` (``llava.one_sided``).
Token embeddings and head train in every arm (the shifts bring new words). The projector trains
with the vision side (``projector_side="encoder"``, our default: frozen in ``llm_only``, so the
whole vision path stays as pretrained there; LLaVA's projector is what adapts visual features to
the LLM), or in every arm (``"bridge"``: then the LLM side can relearn what the frozen encoder
still carries, and LLM-only matched tuning both in every shift of the 300-step runs).
Score: answer accuracy (every answer word right, teacher forced) on a held-out test split.
CoMMIT-style diagnostics on ``both``: each side's LoRA gradient norm over the square root of its
parameter count, and κ_t of ``BalanceScheduler``s with ``eta=0`` (they measure, never act), raw
and per parameter (``normalise="parameters"``), over the two sides' LoRA tensors (projector,
embeddings and head are the schedulers' ``rest``).

The check (``judge``): ACCEPTED only if the stage-4 model answers its own distribution and, in at
least one shift, LLM-only and encoder-only LoRA differ from each other and each from tuning
both (paired 95 % intervals over seeds excluding zero).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fused_balance.study.data import (COLOURS, HELD_OUT_SHAPES, PLACES, PRETRAINING, TESTBED_WORDS, TEST_SEED,
                                      TRAIN_SEED_BASE, VALIDATION_SEED, SceneStyle, sample_scenes)
from fused_balance.study.llava import QUESTION_WORDS, SPECIALS
from fused_balance.study.stats import mean_std, paired

# RGB offsets of a quadrant's coloured cells, "warm" or "cool" at random in every picture
TINTS = {"warm": (0.25, 0.0, -0.25), "cool": (-0.25, 0.0, 0.25)}
VOCAB = SPECIALS + tuple(sorted(set(TESTBED_WORDS) | set(QUESTION_WORDS) | set(TINTS) | {"tint"}))
IMAGE_TOKENS = 4  # one per quadrant (patch 16 on a 32x32 picture)
ARMS = ("both", "llm_only", "encoder_only")
# where the projector trains: "encoder" (with the vision side: frozen in llm_only, as LLaVA's
# projector adapts visual features to the LLM), "bridge" (in every arm, as embeddings and head)
PROJECTOR_SIDES = ("encoder", "bridge")
# arms of the scheduler check (run only on an accepted testbed): an acting BalanceScheduler over
# both sides' LoRA (default rates), κ raw or per parameter, or from the KL changes of the answer
# distribution on the training batch averaged over 10 steps (rates moved every 10 steps), or κ raw
# plus the distribution-change auxiliary loss (weight 1, on the answer logits of the training batch);
# compared with ``both`` (constant rates)
SCHEDULED = {"sched_first": dict(normalise="none"), "sched_per_parameter": dict(normalise="parameters"),
             "sched_kl_window": dict(measure="kl", update_every=10),
             "sched_aux_change": dict(aux="distribution_change", aux_weight=1.0)}
SHIFTS = {"new_shapes": (SceneStyle(shapes=tuple(HELD_OUT_SHAPES.items())), "shape"),
          "tint": (PRETRAINING, "tint"),
          "new_format": (PRETRAINING, "what"),
          "tint_and_shape": (PRETRAINING, "tint_and_shape")}
CACHE_VERSION = 2  # part of the pretraining cache's key: bumped when the data or stages change
BASE_QUESTIONS = ("colour", "shape", "count")
# Acceptance: the stage-4 model answers its own questions (mean over seeds) ...
BASE_MIN_ACC = 0.8
PAIRS = (("llm_only", "encoder_only"), ("both", "llm_only"), ("both", "encoder_only"))

_MODEL = dict(hidden=48, layers=2, max_objects=2, noise=0.05, batch=64, lr=5e-3)
_SHIFT = dict(rank=4, lr=2e-3, batch_size=16, eval_every=30, diag_every=5, projector_side="encoder")
CONFIGS = {
    "tiny": dict(seeds=2, eval_examples=16, model=dict(_MODEL, hidden=16, stage_steps=[5, 5, 5, 5]),
                 shift=dict(_SHIFT, steps=4, eval_every=2, diag_every=2)),
    "quick": dict(seeds=5, eval_examples=256, model=dict(_MODEL, stage_steps=[300, 300, 200, 4000]),
                  shift=dict(_SHIFT, steps=900)),
    "full": dict(seeds=10, eval_examples=256, model=dict(_MODEL, stage_steps=[300, 300, 200, 4000]),
                 shift=dict(_SHIFT, steps=900)),
}


def tok(word: str) -> int:
    return VOCAB.index(word)


def ask(scene, rng: torch.Generator, kind: str, tints: dict | None = None) -> tuple[list[str], list[str]]:
    """(question, answer) of ``kind``: colour / shape / tint (``tints``: place -> word) at a
    place (mostly an occupied one, else maybe "nothing"), the count, "what" (the two-word
    "<colour> <shape>" of a place) or "tint_and_shape" (the same question, "<tint> <shape>")."""
    if kind == "count":
        return ["how", "many", "shapes", "?"], [("one", "two", "three", "four")[len(scene.objects) - 1]]
    occupied = [o[2] for o in scene.objects]
    if float(torch.rand((), generator=rng)) < 0.75:
        place = occupied[int(torch.randint(len(occupied), (1,), generator=rng))]
    else:
        place = list(PLACES)[int(torch.randint(len(PLACES), (1,), generator=rng))]
    found = [o for o in scene.objects if o[2] == place]
    if kind == "what":
        return ["what", "is", "in", "the", *place.split(), "?"], list(found[0][:2]) if found else ["nothing"]
    if kind == "tint_and_shape":
        return ["what", "is", "in", "the", *place.split(), "?"], [tints[place], found[0][1]] if found else ["nothing"]
    answer = ({"colour": found[0][0], "shape": found[0][1]}.get(kind) or tints[place]) if found else "nothing"
    return ["what", kind, "is", "in", "the", *place.split(), "?"], [answer]


def encode(rows, pixel_values: torch.Tensor | None) -> dict:
    """Right-padded ``<bos> [<image> x 4] prompt answer <eos>`` per (prompt, answer) row;
    ``target``: positions whose next token is trained (answer and <eos>), ``scored``: those
    predicting an answer word (accuracy)."""
    image = [tok("<image>")] * IMAGE_TOKENS if pixel_values is not None else []
    seqs = [[tok("<bos>")] + image + [tok(w) for w in prompt] + [tok(w) for w in answer] + [tok("<eos>")]
            for prompt, answer in rows]
    T = max(map(len, seqs))
    ids = torch.full((len(rows), T), tok("<pad>"), dtype=torch.long)
    attention, target, scored = (torch.zeros(len(rows), T, dtype=torch.bool) for _ in range(3))
    for b, (seq, (_, answer)) in enumerate(zip(seqs, rows)):
        ids[b, :len(seq)] = torch.tensor(seq)
        attention[b, :len(seq)] = True
        first = len(seq) - len(answer) - 2  # the position predicting the first answer word
        target[b, first:len(seq) - 1] = True
        scored[b, first:len(seq) - 2] = True
    batch = {"input_ids": ids, "attention_mask": attention.long(), "target": target[:, :-1],
             "scored": scored[:, :-1]}
    if pixel_values is not None:
        batch["pixel_values"] = pixel_values
    return batch


def make_batch(n: int, rng: torch.Generator, cfg: dict, style: SceneStyle = PRETRAINING, kind: str = "base",
               image: bool = True) -> dict:
    """``kind``: "caption" (the scene's caption), "base" (a random base question) or one
    question kind of ``ask``; ``image=False``: text only (no picture tokens)."""
    from fused_balance.study.llava import pixel_values

    scenes = sample_scenes(n, rng, cfg["max_objects"], style)
    warm = torch.rand(n, len(PLACES), generator=rng) < 0.5  # per quadrant; a nuisance unless asked about
    if kind == "caption":
        rows = [([], list(s.caption)) for s in scenes]
    else:
        kinds = [BASE_QUESTIONS[int(torch.randint(3, (1,), generator=rng))] if kind == "base" else kind
                 for _ in scenes]
        rows = [ask(s, rng, k, {place: "warm" if w else "cool" for place, w in zip(PLACES, row)})
                for s, k, row in zip(scenes, kinds, warm.tolist())]
    return encode(rows, pixel_values(scenes, rng, cfg["noise"], cell_tint(scenes, warm)) if image else None)


def cell_tint(scenes, warm: torch.Tensor) -> torch.Tensor:
    """[N, 16, 3] RGB offsets: each coloured cell of a quadrant gets its quadrant's tint (``warm``
    [N, 4]: warm, else cool); background cells none."""
    offsets = torch.tensor([TINTS["cool"], TINTS["warm"]])[warm.long()]  # [N, 4, 3]
    quadrant = torch.tensor([(r // 2) * 2 + c // 2 for r in range(4) for c in range(4)])  # cell -> quadrant
    coloured = torch.tensor([s.grid for s in scenes]) > 0
    return offsets[:, quadrant] * coloured[..., None]


def _logits(model, batch: dict) -> torch.Tensor:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}
    return model(**inputs).logits[:, :-1]


def loss_of(model, batch: dict, logits: torch.Tensor | None = None) -> torch.Tensor:
    """The answer cross-entropy; ``logits``: the model's on ``batch`` (``_logits``), when already made."""
    mask = batch["target"]
    logits = _logits(model, batch) if logits is None else logits
    return F.cross_entropy(logits[mask], batch["input_ids"][:, 1:][mask])


@torch.no_grad()
def answer_accuracy(model, batch: dict, per: str = "example") -> float:
    """Fraction of examples with every answer word the argmax (teacher forced); ``per="word"``:
    fraction of answer words (for captions, whose phrasing is drawn at random)."""
    was = model.training
    model.eval()
    right = _logits(model, batch).argmax(-1) == batch["input_ids"][:, 1:]
    model.train(was)
    if per == "word":
        return float(right[batch["scored"]].float().mean())
    return float((right | ~batch["scored"]).all(-1).float().mean())


def _train(model, params, steps: int, lr: float, batches) -> None:
    """``params`` alone train (everything else frozen: no gradient piles up in tensors this stage
    does not step), AdamW with a linear decay to zero."""
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / steps)
    for _ in range(steps):
        loss_of(model, batches()).backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)


def _quadrant_loss(model, heads, batch: dict, scenes) -> torch.Tensor:
    from fused_balance.study.encoder import quadrant_labels

    features = model.model.vision_tower(batch["pixel_values"]).last_hidden_state[:, 1:]  # [B, 4, H], no CLS
    colour, shape = quadrant_labels(scenes)
    return (F.cross_entropy(heads[0](features).flatten(0, 1), colour.flatten())
            + F.cross_entropy(heads[1](features).flatten(0, 1), shape.flatten()))


def pretrain(seed: int, cfg: dict, n_eval: int):
    """The four stages (module docstring); returns the model and its scores."""
    from fused_balance.study.data import SHAPES
    from fused_balance.study.encoder import quadrant_labels
    from fused_balance.study.llava import build_model, pixel_values

    started = time.perf_counter()
    model = build_model(seed, hidden=cfg["hidden"], layers=cfg["layers"], rank=None, vocab=VOCAB, patch_size=16)
    vision, projector = model.model.vision_tower, model.model.multi_modal_projector
    llm = [*model.model.language_model.parameters(), *model.lm_head.parameters()]
    rng = torch.Generator().manual_seed(TRAIN_SEED_BASE + 900 + seed)  # not the shifts' batches
    steps = cfg["stage_steps"]
    # 1. encoder: each quadrant's colour and shape (up to 4 objects, so every quadrant is seen full)
    heads = torch.nn.ModuleList([torch.nn.Linear(cfg["hidden"], 1 + len(COLOURS)),
                                 torch.nn.Linear(cfg["hidden"], 1 + len(SHAPES))])
    optimizer = torch.optim.AdamW([*vision.parameters(), *heads.parameters()], lr=cfg["lr"], weight_decay=0.0)
    for _ in range(steps[0]):
        scenes = sample_scenes(cfg["batch"], rng, 4)
        tint = cell_tint(scenes, torch.rand(len(scenes), len(PLACES), generator=rng) < 0.5)  # a nuisance here
        _quadrant_loss(model, heads, {"pixel_values": pixel_values(scenes, rng, cfg["noise"], tint)},
                       scenes).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    split = torch.Generator().manual_seed(TEST_SEED + 1100)
    test = sample_scenes(n_eval, split, 4)
    tint = cell_tint(test, torch.rand(n_eval, len(PLACES), generator=split) < 0.5)
    with torch.no_grad():
        features = vision(pixel_values(test, split, cfg["noise"], tint)).last_hidden_state[:, 1:]
    colour, shape = quadrant_labels(test)
    encoder_scores = {"quadrant_colour_acc": float((heads[0](features).argmax(-1) == colour).float().mean()),
                      "quadrant_shape_acc": float((heads[1](features).argmax(-1) == shape).float().mean())}
    # 2. LLM on text; 3. projector on captions of pictures; 4. projector + LLM on questions
    _train(model, llm, steps[1], cfg["lr"], lambda: make_batch(cfg["batch"], rng, cfg, kind="caption", image=False))
    _train(model, list(projector.parameters()), steps[2], cfg["lr"],
           lambda: make_batch(cfg["batch"], rng, cfg, kind="caption"))
    split = torch.Generator().manual_seed(TEST_SEED + 1200)
    aligned_caption_acc = answer_accuracy(model, make_batch(n_eval, split, cfg, kind="caption"), "word")
    _train(model, [*projector.parameters(), *llm], steps[3], cfg["lr"], lambda: make_batch(cfg["batch"], rng, cfg))
    model.requires_grad_(False)
    scores = {"encoder": encoder_scores, "aligned_caption_word_acc": aligned_caption_acc,
              "base_acc": answer_accuracy(model, make_batch(n_eval, split, cfg)),
              "base_acc_by_kind": {k: answer_accuracy(model, make_batch(n_eval, split, cfg, kind=k))
                                   for k in BASE_QUESTIONS},
              "wall_s": time.perf_counter() - started}
    return model, scores


def pretrained(out: Path, seed: int, cfg: dict, n_eval: int):
    """The stage-4 model of ``seed``, loaded from ``out/cache/testbed_llava/seed<k>/`` when it was
    made with the same settings, else made and stored there (``info["cached"]`` says which)."""
    from fused_balance.study.jobs import cached_model
    from fused_balance.study.llava import build_model

    model, info = cached_model(
        out / "cache" / "testbed_llava" / f"seed{seed}",
        {**cfg, "seed": seed, "eval_examples": n_eval, "vocab": VOCAB, "version": CACHE_VERSION},
        lambda: pretrain(seed, cfg, n_eval),
        lambda: build_model(seed, hidden=cfg["hidden"], layers=cfg["layers"], rank=None, vocab=VOCAB, patch_size=16))
    return model.requires_grad_(False), info


def train_shift(model, shift: str, arm: str, seed: int, cfg: dict, test: dict, valid: dict | None = None) -> dict:
    """One LoRA run of ``arm`` (``ARMS`` or ``SCHEDULED``) on ``shift`` from the stage-4 ``model``
    (changed in place); the curve holds the ``test`` accuracy and, given ``valid``, the
    validation accuracy (``valid_acc``)."""
    from fused_balance.study.llava import BRIDGE, add_lora, one_sided
    from fused_balance.training import BalanceScheduler

    if arm not in ARMS + tuple(SCHEDULED):
        raise ValueError(f"unknown arm {arm!r}; choose one of {ARMS + tuple(SCHEDULED)}")
    if cfg["projector_side"] not in PROJECTOR_SIDES:
        raise ValueError(f"unknown projector_side {cfg['projector_side']!r}; choose one of {PROJECTOR_SIDES}")
    started = time.perf_counter()
    add_lora(model, seed, cfg["rank"])
    comps = one_sided(model, arm)
    if cfg["projector_side"] == "encoder" and arm == "llm_only":  # the whole vision path stays as pretrained
        model.model.multi_modal_projector.requires_grad_(False)
        comps = {k: [p for p in v if p.requires_grad] for k, v in comps.items()}
    lora = {side: [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n
                   and ("vision_tower" in n) == (side == "encoder")] for side in ("encoder", "llm")}
    bridge = [p for n, p in model.named_parameters() if p.requires_grad and any(k in n for k in BRIDGE)]
    params = [p for ps in comps.values() for p in ps]
    monitors = {}
    if arm == "both" or arm in SCHEDULED:  # one AdamW group per side, so a scheduler can set its rate
        optimizer = torch.optim.AdamW(BalanceScheduler.param_groups(lora, rest=bridge, lr=cfg["lr"]),
                                      weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    if arm == "both":  # diagnostics: schedulers that measure κ (raw, per parameter) and never act (eta=0)
        monitors = {key: BalanceScheduler(optimizer, lora, rest=bridge, eta=0.0, normalise=normalise)
                    for key, normalise in (("kappa", "none"), ("kappa_per_parameter", "parameters"))}
    current = {}  # the training batch, for a KL scheduler's probe (its answer distribution)
    if arm in SCHEDULED:  # an acting scheduler (default rates) over the same groups as ``both``
        probe = lambda: _logits(model, current["batch"])[current["batch"]["target"]]  # noqa: E731
        monitors = {"kappa": BalanceScheduler(optimizer, lora, rest=bridge, **SCHEDULED[arm],
                                              probe_fn=probe if SCHEDULED[arm].get("measure") == "kl" else None)}
    style, kind = SHIFTS[shift]
    rng = torch.Generator().manual_seed(TRAIN_SEED_BASE + 1300 + seed)  # the same batches in every arm
    curve, norms = [], []
    for step in range(cfg["steps"]):
        batch = current["batch"] = make_batch(cfg["batch_size"], rng, cfg, style, kind)
        scheduler = monitors["kappa"] if arm in SCHEDULED else None
        if scheduler is not None and scheduler.aux_weight > 0:  # answer logits before the last step, then now
            previous = scheduler.previous_outputs(lambda: _logits(model, batch))
            logits = _logits(model, batch)
            aux = scheduler.auxiliary_loss(logits, batch["target"], previous_logits=previous)
            (loss_of(model, batch, logits) + aux).backward()
        else:
            loss_of(model, batch).backward()
        if arm == "both" and step % cfg["diag_every"] == 0:
            norms.append({"step": step, **{side: math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in ps)
                                                           / sum(p.numel() for p in ps))
                                           for side, ps in lora.items()}})
        optimizer.step()
        for monitor in monitors.values():
            monitor.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == cfg["steps"]:
            curve.append({"step": step + 1, "acc": answer_accuracy(model, test),
                          **({"valid_acc": answer_accuracy(model, valid)} if valid is not None else {})})
    result = {"shift": shift, "arm": arm, "seed": seed, "acc": curve[-1]["acc"], "curve": curve,
              "wall_s": time.perf_counter() - started}
    for key, monitor in monitors.items():
        result[key] = [h["kappa"] for h in monitor.history]
        if arm in SCHEDULED:
            result["multipliers"] = [h["multipliers"] for h in monitor.history]
        monitor.close()
    if arm == "both":
        result["grad_norms"] = norms
    return result


def test_split(shift: str, cfg: dict, n_eval: int, base: int = TEST_SEED) -> dict:
    """The held-out split of ``shift`` (``base=VALIDATION_SEED``: the validation split)."""
    style, kind = SHIFTS[shift]
    return make_batch(n_eval, torch.Generator().manual_seed(base + 1400 + list(SHIFTS).index(shift)), cfg,
                      style, kind)


def judge(accuracies: dict, base_acc: list[float]) -> dict:
    """Acceptance from numbers alone. ``accuracies[shift][arm]``: final accuracy per seed (paired
    by position); ``base_acc``: the stage-4 model's accuracy on its own questions per seed."""
    rows = {}
    for shift, arms in accuracies.items():
        diffs = {f"{a} - {b}": paired(arms[a], arms[b]) for a, b in PAIRS}
        rows[shift] = {"diffs": {k: {m: d[m] for m in ("mean", "low", "high", "n", "excludes_zero")}
                                 for k, d in diffs.items()},
                       "separates": all(d["n"] > 1 and d["excludes_zero"] for d in diffs.values())}
    criteria = {"the instruction-tuned model answers its questions":
                bool(base_acc) and sum(base_acc) / len(base_acc) >= BASE_MIN_ACC,
                "LLM-only, encoder-only and both differ (some shift)": any(r["separates"] for r in rows.values())}
    return {"accepted": all(criteria.values()), "criteria": criteria,
            "failing": [c for c, ok in criteria.items() if not ok], "shifts": rows,
            "thresholds": {"base_min_acc": BASE_MIN_ACC}}


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}"


def check_markdown(verdict: dict, accuracies: dict, pretraining: list, diagnostics: dict, meta: dict) -> str:
    status = "ACCEPTED" if verdict["accepted"] else "NOT ACCEPTED"
    ms = lambda values: "{:.1f} ± {:.1f}".format(*(100 * x for x in mean_std(values)))  # noqa: E731
    lines = [f"# Testbed check (encoder + LLM, LLaVA-style): **{status}**", "",
             f"No balancing method ran. Seeds {meta['seeds']}, configuration `{meta['configuration']}`, "
             f"{meta['workers']} worker process(es) of 1 torch thread, {meta['wall_s']:.0f} s wall "
             f"({meta['date_utc']}).", ""]
    if verdict["failing"]:
        lines += ["Failing: " + "; ".join(verdict["failing"]) + ".", ""]
    lines += ["## Pretrained model (stage 4, its own distribution; mean ± std over seeds, %)", "",
              "| encoder quadrant colour / shape | caption words after alignment "
              "| questions: all / colour / shape / count |",
              "|---|---|---|",
              f"| {ms(p['encoder']['quadrant_colour_acc'] for p in pretraining)} / "
              f"{ms(p['encoder']['quadrant_shape_acc'] for p in pretraining)} "
              f"| {ms(p['aligned_caption_word_acc'] for p in pretraining)} "
              f"| {ms(p['base_acc'] for p in pretraining)} / "
              + " / ".join(ms(p["base_acc_by_kind"][k] for p in pretraining) for k in BASE_QUESTIONS) + " |",
              "", "## Per shift: final answer accuracy (%) and paired differences (points, 95 % CI)", "",
              "| shift | both | LLM-only | encoder-only | " + " | ".join(f"{a} − {b}" for a, b in PAIRS)
              + " | separates |", "|---|---|---|---|" + "---|" * len(PAIRS) + "---|"]
    for shift, row in verdict["shifts"].items():
        cells = [ms(accuracies[shift][arm]) for arm in ARMS]
        cells += [f"{_pct(d['mean'])} [{_pct(d['low'])}, {_pct(d['high'])}]" for d in row["diffs"].values()]
        lines.append(f"| {shift} | " + " | ".join(cells) + f" | {'yes' if row['separates'] else 'no'} |")
    lines += ["", "## Diagnostics (arm `both`, mean over seeds): LoRA gradient norm / √parameters, κ_t", "",
              "| shift | ‖g_enc‖/√n, first / last | ‖g_llm‖/√n, first / last "
              "| κ at 10 % / 50 % / 100 % of the steps | κ per parameter, same steps |",
              "|---|---|---|---|---|"]
    for shift, d in diagnostics.items():
        lines.append(f"| {shift} | {d['encoder'][0]:.2e} / {d['encoder'][1]:.2e} | {d['llm'][0]:.2e} / "
                     f"{d['llm'][1]:.2e} | " + " | ".join(" / ".join("n/a" if k is None else f"{k:.2f}" for k in d[key])
                                                          for key in ("kappa", "kappa_per_parameter")) + " |")
    lines += ["", "## Criteria", "",
              f"- the instruction-tuned model answers its own questions: mean accuracy ≥ "
              f"{100 * verdict['thresholds']['base_min_acc']:.0f} %",
              "- in some shift, LLM-only and encoder-only LoRA differ from each other and each from tuning both: "
              "all three paired 95 % intervals exclude zero", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {c}" for c, ok in verdict["criteria"].items()]
    return "\n".join(lines) + "\n"


def diagnostics_of(runs: list[dict]) -> dict:
    """Mean over seeds of the ``both`` runs' normalised gradient norms (first, last record) and
    κ at 10 / 50 / 100 % of the steps (None where the scheduler had no share yet)."""
    def at(series, fraction):
        values = [s[max(0, math.ceil(fraction * len(s)) - 1)] for s in series if s]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None
    norms = {side: (sum(r["grad_norms"][0][side] for r in runs) / len(runs),
                    sum(r["grad_norms"][-1][side] for r in runs) / len(runs)) for side in ("encoder", "llm")}
    return {**norms, **{key: [at([r[key] for r in runs], f) for f in (0.1, 0.5, 1.0)]
                        for key in ("kappa", "kappa_per_parameter")}}


def _pretraining_job(out: Path, seed: int, cfg: dict, n_eval: int) -> dict:
    from fused_balance.study.jobs import in_worker

    in_worker()
    return pretrained(out, seed, cfg, n_eval)[1]


def _shift_job(out: Path, seed: int, shift: str, arm: str, mcfg: dict, scfg: dict, n_eval: int) -> dict:
    from fused_balance.study.jobs import in_worker, run_job

    in_worker()

    def run():
        model, _ = pretrained(out, seed, mcfg, n_eval)
        return train_shift(model, shift, arm, seed, scfg, test_split(shift, scfg, n_eval))
    return run_job(out / "jobs" / "testbed_llava" / shift / f"{arm}__seed{seed}.json", run,
                   {"model": mcfg, "shift": scfg, "eval_examples": n_eval, "arm": arm, "diagnostics": 2})


def testbed_check(out: Path, size: str, seeds: list[int], *, progress: bool = True, workers: int = 1,
                  config: dict | None = None, plots: bool = True) -> dict:
    """Pretraining (cached) and the three arms on every shift per seed; writes
    ``out/testbed_llava_check.md``, ``.json`` and (``plots``) ``testbed_llava.png`` (accuracy
    curves, κ_t, normalised gradient norms); finished jobs are read back
    (``out/jobs/testbed_llava/<shift>/<arm>__seed<k>.json``). Only when ACCEPTED: the scheduler
    check on every separating shift (``scheduler_check``; ``result["scheduler"][shift]``)."""
    from tqdm.auto import tqdm

    from fused_balance.study.jobs import run_staged

    config = config or CONFIGS[size]
    started = time.perf_counter()
    mcfg, n_eval = config["model"], config["eval_examples"]
    scfg = {**config["shift"], "max_objects": mcfg["max_objects"], "noise": mcfg["noise"]}
    bar = tqdm(total=len(seeds) * (1 + len(SHIFTS) * len(ARMS)), desc=f"encoder+LLM testbed check ({size})",
               disable=not progress, dynamic_ncols=True, file=sys.stderr)
    infos, found = run_staged(
        seeds, lambda seed: (_pretraining_job, out, seed, mcfg, n_eval),
        lambda seed: {(seed, shift, arm): (_shift_job, out, seed, shift, arm, mcfg, scfg, n_eval)
                      for shift in SHIFTS for arm in ARMS}, workers, bar)
    bar.close()
    pretraining = [infos[seed] for seed in seeds]
    accuracies = {shift: {arm: [found[seed, shift, arm]["acc"] for seed in seeds] for arm in ARMS}
                  for shift in SHIFTS}
    diagnostics = {shift: diagnostics_of([found[seed, shift, "both"] for seed in seeds]) for shift in SHIFTS}
    verdict = judge(accuracies, [p["base_acc"] for p in pretraining])
    meta = {"configuration": size, "seeds": seeds, "workers": workers, "threads_per_worker": 1, "config": config,
            "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": time.perf_counter() - started}
    out.mkdir(parents=True, exist_ok=True)
    (out / "testbed_llava_check.md").write_text(check_markdown(verdict, accuracies, pretraining, diagnostics, meta))
    result = {"verdict": verdict, "accuracies": accuracies, "diagnostics": diagnostics, "pretraining": pretraining,
              "curves": {f"{shift}/{arm}/seed{seed}": found[seed, shift, arm]["curve"]
                         for seed in seeds for shift in SHIFTS for arm in ARMS}, "meta": meta}
    (out / "testbed_llava_check.json").write_text(json.dumps(result, indent=1))
    separating = [shift for shift, row in verdict["shifts"].items() if row["separates"]]
    if verdict["accepted"]:  # the method runs only on an accepted testbed, on each shift that separates the arms
        result["scheduler"] = {shift: scheduler_check(out, size, seeds, shift, progress=progress, workers=workers,
                                                      config=config, plots=plots)["verdict"] for shift in separating}
    if plots:
        from fused_balance.study.plots import plot_testbed_llava

        plot_testbed_llava(out / "testbed_llava.png", {shift: {arm: [found[seed, shift, arm] for seed in seeds]
                                                               for arm in ARMS} for shift in SHIFTS})
    return result


# the scheduler target (issue 21): the constant-rate final accuracy within this fraction of the steps
SCHEDULER_TARGET_FRACTION = 0.75


def _scheduler_job(out: Path, seed: int, shift: str, arm: str, mcfg: dict, scfg: dict, n_eval: int) -> dict:
    from fused_balance.study.jobs import in_worker, run_job

    in_worker()

    def run():
        model, _ = pretrained(out, seed, mcfg, n_eval)
        return train_shift(model, shift, arm, seed, scfg, test_split(shift, scfg, n_eval),
                           test_split(shift, scfg, n_eval, VALIDATION_SEED))
    return run_job(out / "jobs" / "testbed_llava_scheduler" / shift / f"{arm}__seed{seed}.json", run,
                   {"model": mcfg, "shift": scfg, "eval_examples": n_eval, "arm": arm})


def reach_fraction(run: dict, goal: float, key: str) -> float:
    """The fraction of the steps after which ``run``'s curve (``key``: "acc" or "valid_acc")
    first reaches ``goal``; 1.0 (the whole budget) when it never does."""
    steps = run["curve"][-1]["step"]
    return next((e["step"] / steps for e in run["curve"] if e[key] >= goal), 1.0)


def judge_scheduler(runs: dict) -> dict:
    """``runs[arm]``: per-seed runs (paired by position) of ``both`` and each ``SCHEDULED`` arm,
    curves with test and validation accuracy. The variant is chosen on validation (the smaller
    mean fraction of steps to reach ``both``'s final validation accuracy; ties: the higher final
    validation accuracy), then judged on test: the target holds when the upper end of the 95 %
    interval of its fraction (steps to ``both``'s final test accuracy) is at most
    ``SCHEDULER_TARGET_FRACTION`` and its final test accuracy is not lower (the paired interval
    of chosen − both reaches zero or above)."""
    from fused_balance.study.stats import interval

    constant = runs["both"]

    def fractions(arm, key):
        return [reach_fraction(r, c["curve"][-1][key], key) for r, c in zip(runs[arm], constant)]

    variants = {}
    for arm in (a for a in runs if a != "both"):  # the scheduled variants run
        final_valid = [r["curve"][-1]["valid_acc"] for r in runs[arm]]
        variants[arm] = {"valid_fraction": interval(fractions(arm, "valid_acc")),
                         "valid_acc": mean_std(final_valid)[0],
                         "test_fraction": interval(fractions(arm, "acc")),
                         "test_acc_minus_constant": {k: v for k, v in paired([r["acc"] for r in runs[arm]],
                                                                             [r["acc"] for r in constant]).items()
                                                     if k != "diffs"}}
    chosen = min(variants, key=lambda a: (variants[a]["valid_fraction"]["mean"], -variants[a]["valid_acc"]))
    row = variants[chosen]
    held = {"fraction": row["test_fraction"]["high"] <= SCHEDULER_TARGET_FRACTION,
            "final accuracy not lower": row["test_acc_minus_constant"]["high"] >= 0.0}
    return {"chosen": chosen, "variants": variants, "held": held, "target_held": all(held.values()),
            "constant_acc": mean_std([r["acc"] for r in constant])[0],
            "target_fraction": SCHEDULER_TARGET_FRACTION}


def scheduler_markdown(shift: str, verdict: dict, meta: dict) -> str:
    pct = lambda d: f"{100 * d['mean']:.0f} % [{100 * d['low']:.0f}, {100 * d['high']:.0f}]"  # noqa: E731
    lines = [f"# Scheduler check on the accepted encoder+LLM testbed, shift `{shift}`: target "
             f"**{'HELD' if verdict['target_held'] else 'NOT HELD'}**", "",
             f"Seeds {meta['seeds']}, configuration `{meta['configuration']}`, {meta['wall_s']:.0f} s wall "
             f"({meta['date_utc']}). Constant rates (`both`): final test accuracy "
             f"{100 * verdict['constant_acc']:.1f} %. Variant chosen on the validation split: "
             f"`{verdict['chosen']}`.", "",
             "| variant | steps to the constant final accuracy (validation) | the same on test "
             "| final test accuracy − constant (points, 95 % CI) |", "|---|---|---|---|"]
    for arm, row in verdict["variants"].items():
        d = row["test_acc_minus_constant"]
        lines.append(f"| {arm}{' (chosen)' if arm == verdict['chosen'] else ''} | {pct(row['valid_fraction'])} "
                     f"| {pct(row['test_fraction'])} | {_pct(d['mean'])} [{_pct(d['low'])}, {_pct(d['high'])}] |")
    lines += ["", f"Fractions of the {meta['steps']} steps (evaluated every {meta['eval_every']}; a seed that "
              "never reaches the constant arm's final accuracy counts as the whole budget), mean and 95 % "
              f"t-interval over seeds. Target: the chosen variant's test fraction ≤ "
              f"{100 * verdict['target_fraction']:.0f} % (upper end of the interval) and its final accuracy not "
              "lower (the paired interval reaches zero or above).", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {c}" for c, ok in verdict["held"].items()]
    return "\n".join(lines) + "\n"


def scheduler_check(out: Path, size: str, seeds: list[int], shift: str, *, progress: bool = True,
                    workers: int = 1, config: dict | None = None, plots: bool = True) -> dict:
    """``both`` and the ``SCHEDULED`` arms on ``shift`` (pretraining cached as for the testbed
    check), with validation curves; writes ``out/testbed_llava_scheduler_<shift>.md``, ``.json``
    and (``plots``) ``.png``. Run on an accepted testbed only (``testbed_check``
    does)."""
    from tqdm.auto import tqdm

    from fused_balance.study.jobs import run_staged

    config = config or CONFIGS[size]
    started = time.perf_counter()
    mcfg, n_eval = config["model"], config["eval_examples"]
    scfg = {**config["shift"], "max_objects": mcfg["max_objects"], "noise": mcfg["noise"]}
    arms = ("both", *SCHEDULED)
    bar = tqdm(total=len(seeds) * (1 + len(arms)), desc=f"scheduler check on {shift} ({size})",
               disable=not progress, dynamic_ncols=True, file=sys.stderr)
    _, found = run_staged(
        seeds, lambda seed: (_pretraining_job, out, seed, mcfg, n_eval),
        lambda seed: {(seed, arm): (_scheduler_job, out, seed, shift, arm, mcfg, scfg, n_eval) for arm in arms},
        workers, bar)
    bar.close()
    runs = {arm: [found[seed, arm] for seed in seeds] for arm in arms}
    verdict = judge_scheduler(runs)
    meta = {"configuration": size, "seeds": seeds, "shift": shift, "steps": scfg["steps"],
            "eval_every": scfg["eval_every"], "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "wall_s": time.perf_counter() - started}
    (out / f"testbed_llava_scheduler_{shift}.md").write_text(scheduler_markdown(shift, verdict, meta))
    result = {"verdict": verdict, "meta": meta,
              "curves": {f"{arm}/seed{seed}": found[seed, arm]["curve"] for seed in seeds for arm in arms},
              "kappa": {f"{arm}/seed{seed}": found[seed, arm]["kappa"] for seed in seeds for arm in SCHEDULED}}
    (out / f"testbed_llava_scheduler_{shift}.json").write_text(json.dumps(result, indent=1))
    if plots:
        from fused_balance.study.plots import plot_testbed_llava_scheduler

        plot_testbed_llava_scheduler(out / f"testbed_llava_scheduler_{shift}.png", shift, runs)
    return result
