"""Whole datasets -> cached latents, as training toolkits cache them, but resumable and
content-addressed: `encode_dataset(src, out)` (or `vaelink dataset SRC -o OUT`) and
`LatentDataset(out)`.

- Sources (`sources`): a folder tree, a list file, Parquet shards holding image bytes (a binary
  column or Hugging Face's Image struct), WebDataset tar shards.
- Preprocessing (`buckets`): SDXL-style aspect-ratio buckets, centre crop or resize, no-upscale,
  a horizontal-flip variant; the original size and crop recorded per row.
- Output (`store`): Parquet shards of self-describing rows plus JSON manifests, written
  atomically; a version folder per set of settings that change latents.
- Runs (`runner`): decode and resize in threads while the engine (or endpoints) encode batches of
  one bucket; resumable after any kill, changed sources re-encoded and their stale rows retired,
  non-finite latents retried in float32, bad inputs skipped and listed.

Needs `pip install 'vaelink[dataset]'` (pyarrow)."""

from __future__ import annotations

from .buckets import BucketSpec, Placement, prepare_pixels
from .runner import DatasetReport, encode_dataset, item_seed, prepare_item
from .store import FORMAT, LatentDataset

__all__ = [
    "FORMAT",
    "BucketSpec",
    "DatasetReport",
    "LatentDataset",
    "Placement",
    "encode_dataset",
    "item_seed",
    "prepare_item",
    "prepare_pixels",
]
