"""Compare two images by their CLIP image features; never encodes text (doctor --script test input).

Written carefully except for model.eval(): the ViT it runs has no dropout, so
train mode changes nothing but the kernel torch picks.
"""
import sys

import open_clip
import torch
from PIL import Image

config, name, weights = sys.argv[1:4]
open_clip.add_model_config(config)
model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights)

a = Image.new("RGB", (64, 64), (200, 40, 40))
b = Image.new("RGB", (64, 64), (40, 40, 200))
b.paste((250, 250, 250), (16, 16, 48, 48))
with torch.no_grad():
    feats = model.encode_image(torch.stack([preprocess(a), preprocess(b)]))
feats = feats / feats.norm(dim=-1, keepdim=True)
print(f"cosine similarity: {float(feats[0] @ feats[1]):.4f}")
