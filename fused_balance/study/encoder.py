"""The testbed's pretrained visual encoder (Emu2-style targets): a tiny causal transformer over
the 16 cells of a picture, pretrained on attribute classification of the synthetic pictures and
then frozen.

- input: each cell's RGB colour (``data.PALETTE``) plus a learned position embedding;
- causal attention in raster order, so the embedding of cell j depends on cells 0..j only: the
  unified model may read the embeddings of the patches drawn so far without seeing the next one;
- output: one ``dim``-wide embedding per cell, layer-normalised (unit RMS, no affine), as
  encoders' features usually are: the regression target's scale is the encoder's, not a knob;
- pretraining heads: the colour of every cell (the frozen *visual decoder*: generated
  embeddings become pictures through it; trained on noisy embeddings so that it decodes imperfect
  regressions), and per quadrant its colour and its shape (none or one of the pretraining
  shapes), read at the quadrant's last cell in raster order (the first that has seen all of it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fused_balance.study.data import CELLS, COLOURS, GRID, PALETTE, PLACES, PRETRAINING, SHAPE, SHAPES

NUM_COLOURS = len(PALETTE)  # background first
QUADRANT_LAST_CELL = tuple((r0 + SHAPE - 1) * GRID + c0 + SHAPE - 1 for r0, c0 in PLACES.values())
DECODER_NOISE = 0.3  # std of the noise the cell-colour decoder is trained under (embeddings have unit RMS)


class VisualEncoder(torch.nn.Module):
    def __init__(self, *, dim: int = 16, width: int = 32, layers: int = 2, heads: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.dim = dim
        self.cell_in = torch.nn.Linear(3, width)
        self.position = torch.nn.Parameter(0.1 * torch.randn(CELLS, width))
        block = torch.nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True)
        self.blocks = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.out = torch.nn.Linear(width, dim)
        self.register_buffer("causal", torch.nn.Transformer.generate_square_subsequent_mask(CELLS))
        self.decoder = torch.nn.Linear(dim, NUM_COLOURS)                   # cell colour
        self.quadrant_colour = torch.nn.Linear(dim, 1 + len(COLOURS))      # none or a colour
        self.quadrant_shape = torch.nn.Linear(dim, 1 + len(SHAPES))        # none or a pretraining shape

    def forward(self, colours: torch.Tensor) -> torch.Tensor:
        """Colour indices [..., 16] -> embeddings [..., 16, dim] (unit RMS)."""
        lead = colours.shape[:-1]
        x = self.cell_in(PALETTE.to(self.position.device)[colours.reshape(-1, CELLS)]) + self.position
        x = self.blocks(x, mask=self.causal, is_causal=True)
        return F.layer_norm(self.out(x), (self.dim,)).view(*lead, CELLS, self.dim)

    def decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The greedy colour of each embedding [..., dim] -> [...]."""
        return self.decoder(embeddings).argmax(-1)


def quadrant_labels(scenes) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, 4] colour and shape class per quadrant (0: empty) of pretraining scenes."""
    places, shapes = list(PLACES), list(SHAPES)
    colour = torch.zeros(len(scenes), len(places), dtype=torch.long)
    shape = torch.zeros_like(colour)
    for i, scene in enumerate(scenes):
        for c, s, p in scene.objects:
            colour[i, places.index(p)] = 1 + COLOURS.index(c)
            shape[i, places.index(p)] = 1 + shapes.index(s)
    return colour, shape


def encoder_losses(encoder: VisualEncoder, scenes, noise_rng: torch.Generator | None = None) -> dict:
    grid = torch.tensor([s.grid for s in scenes])
    emb = encoder(grid)
    noise = torch.randn(emb.shape, generator=noise_rng) if noise_rng is not None else torch.zeros_like(emb)
    colour, shape = quadrant_labels(scenes)
    last = emb[:, list(QUADRANT_LAST_CELL)]
    cell_logits = encoder.decoder(emb + DECODER_NOISE * noise)
    return {"cell": F.cross_entropy(cell_logits.flatten(0, 1), grid.flatten()),
            "quadrant_colour": F.cross_entropy(encoder.quadrant_colour(last).flatten(0, 1), colour.flatten()),
            "quadrant_shape": F.cross_entropy(encoder.quadrant_shape(last).flatten(0, 1), shape.flatten()),
            "logits": (cell_logits, encoder.quadrant_colour(last), encoder.quadrant_shape(last)),
            "labels": (grid, colour, shape)}


def pretrain_encoder(seed: int, cfg: dict) -> tuple[VisualEncoder, dict]:
    """Train on pretraining scenes (1..cfg["max_objects"] objects), freeze; held-out accuracies."""
    from fused_balance.study.data import TEST_SEED, TRAIN_SEED_BASE, sample_scenes

    encoder = VisualEncoder(dim=cfg["visual_dim"], width=cfg["encoder_width"], seed=seed)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=cfg["encoder_lr"], weight_decay=0.0)
    rng = torch.Generator().manual_seed(TRAIN_SEED_BASE + 500 + seed)  # not the LLM's batches
    for _ in range(cfg["encoder_steps"]):
        losses = encoder_losses(encoder, sample_scenes(cfg["encoder_batch"], rng, cfg["max_objects"], PRETRAINING), rng)
        (losses["cell"] + losses["quadrant_colour"] + losses["quadrant_shape"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    encoder.requires_grad_(False).eval()
    test = sample_scenes(256, torch.Generator().manual_seed(TEST_SEED + 500), cfg["max_objects"], PRETRAINING)
    with torch.no_grad():
        out = encoder_losses(encoder, test, torch.Generator().manual_seed(1))
    accuracy = [float((logits.argmax(-1) == labels).float().mean())
                for logits, labels in zip(out["logits"], out["labels"])]
    return encoder, dict(zip(("cell_colour_acc_noisy", "quadrant_colour_acc", "quadrant_shape_acc"), accuracy))
