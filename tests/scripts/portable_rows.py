"""Portable rows of the demo model (and optionally a real architecture) in this process, as one JSON line.

Run natively and under ``qemu-x86_64 -cpu <model>`` by tests/test_portable_xcpu.py: the rows must
be bitwise the same on every CPU. Everything runs in this one process (no replicas, no exec), so
the CPU that computed them is the one ``cpuid`` reports below. Rows come straight from the forward
core at one thread (the engine's self-checks would only slow the emulated CPU down); the demo's
golden proof runs as an engine's start-up runs it.
"""
import argparse
import json
import os
import sys
from typing import Any

import torch

import steadyclip
from steadyclip._util.digest import sha256_array
from steadyclip.engine import portable_proof
from steadyclip.engine._core import ForwardCore
from steadyclip.engine.probe_inputs import probe_images
from steadyclip.engine.settings import EngineSettings
from steadyclip.numerics.cpuid import cpu_facts
from steadyclip.numerics.portable import blas_facts

parser = argparse.ArgumentParser()
parser.add_argument("--arch")
parser.add_argument("--weights")
args = parser.parse_args()
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
examples = sorted(os.path.join(root, "examples", f) for f in os.listdir(os.path.join(root, "examples"))
                  if f.endswith(".png"))
texts = ["a photo of a red circle", "blue square", "x " * 40]


def rows(loaded: Any, images: list[Any], texts: list[str], **shapes: Any) -> tuple[ForwardCore, str, str]:
    core = ForwardCore(loaded, EngineSettings(profile="portable", threads=1, **shapes))
    pixels = torch.stack([core.preprocess(im) for im in images])
    return core, sha256_array(core.embed_local("image", pixels)), sha256_array(
        core.embed_local("text", loaded.tokenizer(texts)))


core, demo_images, demo_texts = rows(steadyclip.load(), examples, texts)
out = {"cpu": cpu_facts(), "pid": os.getpid(), "python": sys.executable,
       "capability": torch.backends.cpu.get_cpu_capability(), "blas": blas_facts()["libraries"][0]["architecture"],
       "proof": portable_proof.prove(core)["status"], "demo_images": demo_images, "demo_texts": demo_texts}
if args.arch:
    loaded = steadyclip.load(args.arch, pretrained=args.weights)
    _, out["arch_images"], out["arch_texts"] = rows(loaded, probe_images(loaded.info.preprocess.size, n=1), texts[:1],
                                                    micro_batch=1, text_micro_batch=1)
print(json.dumps(out))
