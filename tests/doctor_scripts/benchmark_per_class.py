"""A zero-shot benchmark CLI as such tools were written before their eval() fix (doctor --script test input).

Each class's prompts are encoded in an encode_text call of their own and averaged
into a classifier; the logits are the script's own (fixed scale 100). The model
is never put in eval mode, and the seed makes every run print the same numbers.
"""
import argparse

import open_clip
import torch
from PIL import Image

CLASSES = ["red circle", "blue square", "green star"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "{}"]

parser = argparse.ArgumentParser()
parser.add_argument("--config", required=True)
parser.add_argument("--model", required=True)
parser.add_argument("--weights", required=True)
args = parser.parse_args()

torch.manual_seed(0)
open_clip.add_model_config(args.config)
model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=args.weights)
tokenizer = open_clip.get_tokenizer(args.model)

with torch.no_grad():
    weights = []
    for name in CLASSES:
        emb = model.encode_text(tokenizer([t.format(name) for t in TEMPLATES]))
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(dim=0)
        weights.append(mean / mean.norm())
    classifier = torch.stack(weights, dim=1)

    correct = 0
    for label, colour in enumerate([(220, 30, 30), (30, 30, 220), (30, 200, 30)]):
        im = Image.new("RGB", (96, 96), (250, 250, 250))
        im.paste(colour, (24, 24, 72, 72))
        feats = model.encode_image(preprocess(im).unsqueeze(0))
        feats = feats / feats.norm(dim=-1, keepdim=True)
        logits = 100.0 * feats @ classifier
        correct += int(logits.argmax(dim=-1).item() == label)
        print(CLASSES[label], [round(p, 4) for p in logits.softmax(dim=-1)[0].tolist()])
print(f"top-1: {correct}/{len(CLASSES)}")
