"""Synthetic interleaved text-image data for the demo, made in code.

A picture is a 4x4 grid of patches holding a coloured 2x2 shape in one quadrant (or up to
``max_objects`` shapes in different quadrants).
Each patch becomes one discrete image token (as a VQ tokenizer's code would be, in a
Chameleon-style unified model); a code names the patch position and its colour, 16 x 7 codes. Its caption says what is where,
in one of several phrasings ("a red cross in the top left", "in the top left there is a red
cross", ...), so captions keep some entropy (a text gradient that never vanishes) while the
picture is fully determined by the caption.

Two directions, as in instruction tuning of a unified model:
- generation:    <bos> <draw> caption <boi> 16 image codes <eoi> <eos>
- understanding: <bos> <describe> <boi> 16 image codes <eoi> caption <eos>
Targets are every next token except the input picture of the understanding direction. Text
targets (captions, in both directions, plus the closing tokens) outnumber the image targets, so
with the usual token-mean loss the text objective dominates the gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GRID = 4
SHAPE = 2
SPECIALS = ["<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<draw>", "<describe>"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = {  # 2x2 masks, row-major
    "square": "1111",
    "diagonal": "1001",
    "slash": "0110",
    "corner": "1110",
    "stripe": "1100",
    "pillar": "1010",
}
PLACES = {"top left": (0, 0), "top right": (0, SHAPE), "bottom left": (SHAPE, 0),
          "bottom right": (SHAPE, SHAPE)}
FILLER = ["a", "an", "there", "is", "in", "the", "at", "has", "and", "picture", "shows", "with",
          "empty", "rest", "of", "it", ".", "corner"]
WORDS = sorted(set(FILLER) | set(COLOURS) | set(SHAPES) | {w for p in PLACES for w in p.split()})


@dataclass(frozen=True)
class Vocab:
    """Token ids: specials, then text words, then image codes (patch position x colour)."""

    words: tuple = tuple(WORDS)

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
        return GRID * GRID * (1 + len(COLOURS))

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
_TEMPLATES = [
    lambda c, s, p: f"a {c} {s} in the {p}",
    lambda c, s, p: f"there is a {c} {s} at the {p}",
    lambda c, s, p: f"in the {p} there is a {c} {s}",
    lambda c, s, p: f"the {p} corner has a {c} {s}",
]


def _caption(objects, rng: torch.Generator) -> list[str]:
    parts = []
    for colour, shape, place in objects:
        t = _TEMPLATES[int(torch.randint(len(_TEMPLATES), (1,), generator=rng))]
        parts.append(t(colour, shape, place))
    text = " and ".join(parts)
    if int(torch.randint(3, (1,), generator=rng)) == 0:
        text += " . the rest of the picture is empty"
    return text.split()


def _picture(objects) -> list[int]:
    grid = [[0] * GRID for _ in range(GRID)]
    for colour, shape, place in objects:
        r0, c0 = PLACES[place]
        code = 1 + COLOURS.index(colour)
        for i, bit in enumerate(SHAPES[shape]):
            if bit == "1":
                grid[r0 + i // SHAPE][c0 + i % SHAPE] = code
    return [VOCAB.image_code(cell, v) for cell, v in enumerate(c for row in grid for c in row)]


def sample_example(rng: torch.Generator, generation: bool, max_objects: int = 1) -> tuple[list[int], list[int]]:
    """(token ids, target mask: 1 where the token is predicted from its prefix)."""
    n_objects = 1 + int(torch.randint(max_objects, (1,), generator=rng))
    places = list(PLACES)
    order = torch.randperm(len(places), generator=rng).tolist()[:n_objects]
    objects = [(COLOURS[int(torch.randint(len(COLOURS), (1,), generator=rng))],
                list(SHAPES)[int(torch.randint(len(SHAPES), (1,), generator=rng))],
                places[i]) for i in sorted(order)]
    caption = [VOCAB.word(w) for w in _caption(objects, rng)]
    picture = _picture(objects)
    v = VOCAB
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
