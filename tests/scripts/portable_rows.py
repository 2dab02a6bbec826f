"""Portable rows of the demo model (and optionally a real architecture) in this process, as one JSON line.

Run natively and under ``qemu-x86_64 -cpu <model>`` by tests/test_portable_xcpu.py: the rows must
be bitwise the same on every CPU. Everything runs in this one process (no replicas, no exec), so
the CPU that computed them is the one ``cpuid`` reports below.
"""
import argparse
import json
import os
import sys

import steadyclip
from steadyclip._util.digest import sha256_array
from steadyclip.engine.probe_inputs import probe_images
from steadyclip.numerics.cpuid import cpu_facts
from steadyclip.numerics.portable import blas_facts

parser = argparse.ArgumentParser()
parser.add_argument("--arch")
parser.add_argument("--weights")
args = parser.parse_args()
here = os.path.dirname(os.path.abspath(__file__))
examples = sorted(os.path.join(here, "..", "..", "examples", f) for f in os.listdir(os.path.join(here, "..", "..", "examples"))
                  if f.endswith(".png"))
texts = ["a photo of a red circle", "blue square", "x " * 40]

engine = steadyclip.Engine(steadyclip.load(), profile="portable", replicas=1, threads=1)
out = {"cpu": cpu_facts(), "pid": os.getpid(), "python": sys.executable,
       "capability": __import__("torch").backends.cpu.get_cpu_capability(),
       "blas": blas_facts()["libraries"][0]["architecture"],
       "proof": engine.provenance.flags["portable_proof"]["status"],
       "demo_images": sha256_array(engine.embed_images(examples)),
       "demo_texts": sha256_array(engine.embed_texts(texts))}
if args.arch:
    loaded = steadyclip.load(args.arch, pretrained=args.weights)
    real = steadyclip.Engine(loaded, profile="portable", replicas=1, threads=1, micro_batch=2, text_micro_batch=2)
    size = loaded.info.preprocess.size
    out["arch_images"] = sha256_array(real.embed_images(probe_images(size, n=2)))
    out["arch_texts"] = sha256_array(real.embed_texts(texts[:2]))
print(json.dumps(out))
