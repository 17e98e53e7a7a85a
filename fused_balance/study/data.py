"""Synthetic scenes for the study, made in code: a 4x4 grid of cells holding 1..max_objects
coloured 2x2 shapes in distinct quadrants (shapes, colours, positions, counts).

A scene gives three views:
- ``grid``: the colour index of each of the 16 cells (0 = background), the picture itself;
- ``caption``: words saying how many shapes there are and what is where, in one of several
  phrasings (the text objective keeps some entropy, so its gradient never vanishes);
- ``render(grid)``: an RGB picture, for pixels in (LLaVA study) and for PSNR / PNG grids.

``SceneStyle`` names what a scene may hold (shapes, object counts, caption phrasings);
``PRETRAINING`` is the default every existing user draws from, and the testbed's instruction
tasks (``TASK_STYLES``) shift it: held-out shapes, more objects per picture, longer captions in
new phrasings. Their new words follow ``WORDS`` in ``TESTBED_WORDS`` (the study's vocabulary and
its token ids stay as they were).

Splits are disjoint streams of one generator family: training batches come from
``torch.Generator().manual_seed(TRAIN_SEED_BASE + seed)``, the validation split (for tuning)
and the test split (for every reported number) from fixed seeds of their own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GRID, SHAPE = 4, 2
CELLS = GRID * GRID
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
PALETTE = torch.tensor([[0.05, 0.05, 0.05], [0.9, 0.1, 0.1], [0.1, 0.75, 0.2], [0.15, 0.3, 0.95],
                        [0.95, 0.9, 0.1], [0.6, 0.2, 0.8], [1.0, 0.55, 0.0]])  # background first
SHAPES = {"square": "1111", "diagonal": "1001", "slash": "0110", "corner": "1110",
          "stripe": "1100", "pillar": "1010"}
PLACES = {"top left": (0, 0), "top right": (0, SHAPE), "bottom left": (SHAPE, 0),
          "bottom right": (SHAPE, SHAPE)}
COUNTS = ("one", "two", "three", "four")
FILLER = ("a", "there", "is", "are", "in", "the", "at", "has", "and", "shape", "shapes", ":",
          "corner", ".", "rest", "empty", "of", "picture", "nothing")
WORDS = tuple(sorted(set(FILLER) | set(COLOURS) | set(SHAPES) | set(COUNTS)
                     | {w for p in PLACES for w in p.split()}))
TRAIN_SEED_BASE, VALIDATION_SEED, TEST_SEED = 1000, 20_000, 30_000

_TEMPLATES = (
    lambda c, s, p: f"a {c} {s} in the {p}",
    lambda c, s, p: f"there is a {c} {s} at the {p}",
    lambda c, s, p: f"in the {p} there is a {c} {s}",
    lambda c, s, p: f"the {p} corner has a {c} {s}",
)
_TAIL = ". the rest of the picture is empty"

# Held out of pretraining: 2x2 patterns none of SHAPES uses, under names it never saw.
HELD_OUT_SHAPES = {"dot": "1000", "hook": "0111", "ell": "1011"}
# The longer-text task: new, longer phrasings (two: the text keeps some entropy) and a closing
# sentence always.
_LONG_TEMPLATES = (
    lambda c, s, p: f"looking at the {p} of the picture you can see one {c} {s} drawn there",
    lambda c, s, p: f"you can see a {c} {s} drawn in the {p} of the picture",
)
_LONG_TAIL = ". every other cell of the picture is left dark and empty"


@dataclass(frozen=True)
class SceneStyle:
    """What a scene may hold: ``min_objects`` .. ``max_objects`` objects (``max_objects`` None:
    the caller's) of these shapes, one caption template per object, and the ``tail`` sentence
    with probability 1/3 (``always_tail``: in every caption)."""

    shapes: tuple = tuple(SHAPES.items())
    templates: tuple = _TEMPLATES
    min_objects: int = 1
    max_objects: int | None = None
    tail: str = _TAIL
    always_tail: bool = False

    def fingerprint(self) -> dict:
        """What the style generates, as plain data (for job caches: a changed task is a new job)."""
        return {"shapes": [list(x) for x in self.shapes], "objects": [self.min_objects, self.max_objects],
                "templates": [t("red", "square", "top left") for t in self.templates], "tail": self.tail,
                "always_tail": self.always_tail}

    def words(self) -> set:
        """Every word its captions can hold besides colours, places and counts."""
        phrased = {w for template in self.templates for w in template("red", "square", "top left").split()}
        return phrased | set(self.tail.split()) | {name for name, _ in self.shapes}


PRETRAINING = SceneStyle()
TASK_STYLES = {
    "new_shapes": SceneStyle(shapes=tuple(HELD_OUT_SHAPES.items()), max_objects=1),  # short captions
    "new_layout": SceneStyle(min_objects=3, max_objects=4),
    "long_text": SceneStyle(templates=_LONG_TEMPLATES, tail=_LONG_TAIL, always_tail=True, max_objects=2),
}
TESTBED_WORDS = WORDS + tuple(sorted(set().union(*(s.words() for s in TASK_STYLES.values())) - set(WORDS)))


@dataclass(frozen=True)
class Scene:
    objects: tuple  # ((colour, shape, place), ...) in place order
    grid: tuple     # 16 colour indices, row-major, 0 = background
    caption: tuple  # words


def _pick(n: int, rng: torch.Generator) -> int:
    return int(torch.randint(n, (1,), generator=rng))


def sample_scene(rng: torch.Generator, max_objects: int = 2, style: SceneStyle = PRETRAINING) -> Scene:
    """One scene of ``style`` (its ``max_objects`` wins over the argument when set); the default
    style draws exactly the random numbers it always did."""
    max_objects = style.max_objects or max_objects
    count = style.min_objects + _pick(max_objects - style.min_objects + 1, rng)
    places = list(PLACES)
    chosen = sorted(torch.randperm(len(places), generator=rng)[:count].tolist())
    shapes = dict(style.shapes)
    objects = tuple((COLOURS[_pick(len(COLOURS), rng)], list(shapes)[_pick(len(shapes), rng)], places[i])
                    for i in chosen)
    grid = [0] * CELLS
    for colour, shape, place in objects:
        r0, c0 = PLACES[place]
        for i, bit in enumerate(shapes[shape]):
            if bit == "1":
                grid[(r0 + i // SHAPE) * GRID + c0 + i % SHAPE] = 1 + COLOURS.index(colour)
    parts = [style.templates[_pick(len(style.templates), rng)](*obj) for obj in objects]
    head = f"{COUNTS[count - 1]} {'shape' if count == 1 else 'shapes'} :"
    text = head + " " + " and ".join(parts)
    if _pick(3, rng) == 0 or style.always_tail:
        text += " " + style.tail
    return Scene(objects, tuple(grid), tuple(text.split()))


def sample_scenes(n: int, rng: torch.Generator, max_objects: int = 2,
                  style: SceneStyle = PRETRAINING) -> list[Scene]:
    return [sample_scene(rng, max_objects, style) for _ in range(n)]


def render(grid: torch.Tensor, cell_pixels: int = 8) -> torch.Tensor:
    """[..., 16] colour indices -> [..., 3, 4*cell_pixels, 4*cell_pixels] RGB in [0, 1]."""
    rgb = PALETTE[grid.long()]  # [..., 16, 3]
    rgb = rgb.view(*grid.shape[:-1], GRID, GRID, 3).movedim(-1, -3)  # [..., 3, 4, 4]
    return rgb.repeat_interleave(cell_pixels, -2).repeat_interleave(cell_pixels, -1)


def psnr(generated: torch.Tensor, target: torch.Tensor, cell_pixels: int = 8) -> float:
    """PSNR (dB, peak 1) of the rendered pictures, from the mean squared error over the whole
    set (finite unless every picture is exact: then capped at 60 dB)."""
    mse = float(((render(generated, cell_pixels) - render(target, cell_pixels)) ** 2).mean())
    return 60.0 if mse <= 1e-6 else min(60.0, -10.0 * torch.log10(torch.tensor(mse)).item())


def cell_scores(generated: torch.Tensor, target: torch.Tensor) -> dict:
    """Cell-level scores of generated pictures [N, 16] against the targets [N, 16]: accuracy,
    foreground (coloured target cells right), background (empty target cells left empty), their
    mean ("cell score", robust to painting everything or nothing), whole pictures exact."""
    ok = generated == target
    fg = target > 0
    fg_acc = float((ok & fg).sum() / fg.sum().clamp(min=1))
    bg_acc = float((ok & ~fg).sum() / (~fg).sum().clamp(min=1))
    return {"cell_acc": float(ok.float().mean()), "fg_acc": fg_acc, "bg_acc": bg_acc,
            "cell_score": 0.5 * (fg_acc + bg_acc), "exact": float(ok.all(-1).float().mean()),
            "psnr": psnr(generated, target)}
