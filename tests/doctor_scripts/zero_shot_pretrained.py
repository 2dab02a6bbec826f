"""open_clip's README example, with the architecture and pretrained tag/file/hub name as arguments.

The careful version: eval(), no_grad, its own preprocessing. Used by doctor --script
tests with weights that are wrong in ways the runs cannot show (doctor --script test input).
"""
import argparse

import open_clip
import torch
from PIL import Image

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("--pretrained", default=None)
parser.add_argument("--config", default=None)
parser.add_argument("--no-eval", action="store_true")
args = parser.parse_args()

torch.manual_seed(0)
if args.config:
    open_clip.add_model_config(args.config)
model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=args.pretrained)
if not args.no_eval:
    model.eval()
tokenizer = open_clip.get_tokenizer(args.model)

image = Image.new("RGB", (120, 100), (220, 30, 30))
image.paste((250, 250, 250), (40, 30, 80, 70))
text = tokenizer(["a diagram", "a dog", "a cat"])
with torch.no_grad():
    image_features = model.encode_image(preprocess(image).unsqueeze(0))
    text_features = model.encode_text(text)
    image_features /= image_features.norm(dim=-1, keepdim=True)
    text_features /= text_features.norm(dim=-1, keepdim=True)
    text_probs = (100.0 * image_features @ text_features.T).softmax(dim=-1)
print("Label probs:", text_probs.tolist())
