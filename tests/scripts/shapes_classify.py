"""A user's zero-shot script over the bundled demo model, the way people write them (used by doctor --script tests).

Each flag reproduces one mistake from the reports: --no-eval, --train-transform,
--autocast, --no-weights. Without flags it is the healthy version.
"""
import argparse
import os

import open_clip
import torch
from PIL import Image
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "..", "..", "src", "steadyclip", "demo")

parser = argparse.ArgumentParser()
for flag in ("--no-eval", "--train-transform", "--autocast", "--no-weights"):
    parser.add_argument(flag, action="store_true")
args = parser.parse_args()

open_clip.add_model_config(os.path.join(DEMO, "steadyclip-shapes.json"))
model, preprocess_train, preprocess = open_clip.create_model_and_transforms("steadyclip-shapes")
if not args.no_weights:
    model.load_state_dict(load_file(os.path.join(DEMO, "steadyclip-shapes.safetensors")))
if not args.no_eval:
    model.eval()
transform = preprocess_train if args.train_transform else preprocess
tokenizer = open_clip.get_tokenizer("steadyclip-shapes")

images = [Image.new("RGB", (96, 80), colour) for colour in ((220, 30, 30), (30, 30, 220))]
for im in images:
    im.paste((30, 200, 30), (30, 25, 60, 55))
pixels = torch.stack([transform(im) for im in images])
text = tokenizer(["red circle", "blue square", "green star"])
amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast)
with torch.no_grad(), amp:
    image_features = model.encode_image(pixels)
    text_features = model.encode_text(text)
image_features = image_features.float() / image_features.float().norm(dim=-1, keepdim=True)
text_features = text_features.float() / text_features.float().norm(dim=-1, keepdim=True)
probs = (100.0 * image_features @ text_features.T).softmax(dim=-1)
print([round(p, 4) for p in probs[0].tolist()])
