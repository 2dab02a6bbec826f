"""Zero-shot evaluation over a DataLoader, logits scaled by the model's own logit_scale (doctor --script test input).

Careful where it matters (eval, no_grad, the eval transform); the weights file is
whatever the command line names.
"""
import argparse

import open_clip
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

LABELS = ["red", "green", "blue"]


class Swatches(Dataset):
    def __init__(self, transform):
        self.transform = transform
        self.colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220)] * 2

    def __len__(self):
        return len(self.colours)

    def __getitem__(self, i):
        return self.transform(Image.new("RGB", (80, 80), self.colours[i])), i % len(LABELS)


parser = argparse.ArgumentParser()
parser.add_argument("--config", required=True)
parser.add_argument("--model", required=True)
parser.add_argument("--weights", required=True)
args = parser.parse_args()

open_clip.add_model_config(args.config)
model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=args.weights)
model.eval()
tokenizer = open_clip.get_tokenizer(args.model)

with torch.no_grad():
    text = model.encode_text(tokenizer([f"a {c} square" for c in LABELS]))
    text = text / text.norm(dim=-1, keepdim=True)
    hits = 0
    for pixels, target in DataLoader(Swatches(preprocess), batch_size=2, num_workers=0):
        feats = model.encode_image(pixels)
        feats = feats / feats.norm(dim=-1, keepdim=True)
        probs = (model.logit_scale.exp() * feats @ text.T).softmax(dim=-1)
        hits += int((probs.argmax(dim=-1) == target).sum())
        print([[round(p, 3) for p in row] for row in probs.tolist()])
print(f"accuracy {hits}/6")
