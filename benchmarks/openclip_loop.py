"""A user's plain open_clip embedding loop, as the scale benchmark compares steadyclip against.

    python -m benchmarks.openclip_loop WEIGHTS FOLDER OUT.npy

DataLoader with ``num_workers`` = the CPUs this process may use, batch 32, torch's
default thread count, the model's eval transform, no_grad: what a careful user writes.
Prints ``{"compute_s": ...}`` (from the loader's creation to the last embedding) so the
benchmark can tell the loop's start-up from its work.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image


class Files(torch.utils.data.Dataset[torch.Tensor]):
    def __init__(self, paths: list[Path], transform: object) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as im:
            out: torch.Tensor = self.transform(im.convert("RGB"))  # type: ignore[operator]
        return out


def main(weights: str, folder: str, out: str) -> None:
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=weights)
    model.eval()
    paths = sorted(Path(folder).glob("*.jpg"))
    cores = len(os.sched_getaffinity(0))
    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(Files(paths, preprocess), batch_size=32, num_workers=cores)
    chunks = []
    with torch.no_grad():
        for batch in loader:
            emb = model.encode_image(batch)
            chunks.append(torch.nn.functional.normalize(emb, dim=-1).numpy())
    compute_s = time.perf_counter() - t0
    np.save(out, np.concatenate(chunks))
    print(json.dumps({"compute_s": compute_s}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
