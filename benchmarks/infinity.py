"""Infinity (PyPI ``infinity-emb==0.0.78``) as the peer of ``steadyclip serve`` in ``benchmarks.texts``.

Infinity runs in its own venv (``make bench-infinity`` builds ``.venv-infinity``): its pins (transformers,
sentence-transformers, numpy 1.x) must not leak into the project's. It loads a Hugging Face model directory,
so :func:`write_hf_clip` converts the open_clip ViT-B-32 state dict the bench builds into transformers'
``CLIPModel`` layout (the same weights in both servers), with a CLIP tokenizer made from open_clip's own BPE
file and a 224 px ``CLIPImageProcessor``. :func:`finish_and_check` then lets transformers (in Infinity's venv)
write its fast-tokenizer file and proves the directory: the same token ids as open_clip's tokenizer, and
text/image features whose cosine with open_clip's is ~1. :func:`spawned_infinity` starts the server with
its defaults (batch size 32, torch engine, torch.compile on, warm-up on, no disk cache, torch's default
thread count: Infinity sets none) on a loopback port.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

VERSION = "0.0.78"
# What `make bench-infinity` installs (torch pinned on the same command line, so pip keeps the project's).
PIP_INSTALL = (f"infinity-emb[server,torch,vision]=={VERSION}", "torch==2.14.1", "torchvision==0.29.1")
SERVED_NAME = "ViT-B-32"
# Everything else is Infinity's default: --batch-size 32, --dtype auto (float32 on CPU), --compile,
# --model-warmup, --no-vector-disk-cache, --bettertransformer (a no-op without optimum).
FLAGS = ("--engine", "torch", "--device", "cpu", "--url-prefix", "/v1", "--host", "127.0.0.1",
         "--served-model-name", SERVED_NAME, "--log-level", "warning")
# No telemetry, no hub: the model is a local directory.
ENV = {"DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1"}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _layers(state: Mapping[str, Any], prefix: str) -> int:
    return 1 + max(int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix))


def _blocks(state: Mapping[str, Any], src: str, dst: str) -> dict[str, Any]:
    """open_clip residual blocks (fused q/k/v) -> transformers ``CLIPEncoderLayer`` keys."""
    out: dict[str, Any] = {}
    for i in range(_layers(state, f"{src}.")):
        s, d = f"{src}.{i}", f"{dst}.{i}"
        for part in ("weight", "bias"):
            for q, name in zip(state[f"{s}.attn.in_proj_{part}"].chunk(3, dim=0), ("q", "k", "v"), strict=True):
                out[f"{d}.self_attn.{name}_proj.{part}"] = q
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{d}.{b}.{part}"] = state[f"{s}.{a}.{part}"]
    return out


def convert_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """An open_clip ``CLIP`` (ViT) state dict -> transformers ``CLIPModel`` keys, tensors contiguous copies."""
    t, v = "text_model", "vision_model"
    out = {f"{t}.embeddings.token_embedding.weight": state["token_embedding.weight"],
           f"{t}.embeddings.position_embedding.weight": state["positional_embedding"],
           f"{t}.final_layer_norm.weight": state["ln_final.weight"], f"{t}.final_layer_norm.bias": state["ln_final.bias"],
           "text_projection.weight": state["text_projection"].t(),  # open_clip: x @ P; a Linear: x @ W.T
           f"{v}.embeddings.class_embedding": state["visual.class_embedding"],
           f"{v}.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
           f"{v}.embeddings.position_embedding.weight": state["visual.positional_embedding"],
           f"{v}.pre_layrnorm.weight": state["visual.ln_pre.weight"], f"{v}.pre_layrnorm.bias": state["visual.ln_pre.bias"],
           f"{v}.post_layernorm.weight": state["visual.ln_post.weight"],
           f"{v}.post_layernorm.bias": state["visual.ln_post.bias"],
           "visual_projection.weight": state["visual.proj"].t(), "logit_scale": state["logit_scale"]}
    out |= _blocks(state, "transformer.resblocks", f"{t}.encoder.layers")
    out |= _blocks(state, "visual.transformer.resblocks", f"{v}.encoder.layers")
    return {k: x.detach().clone().contiguous() for k, x in out.items()}


def clip_config(state: Mapping[str, Any]) -> dict[str, Any]:
    """transformers ``CLIPConfig`` for the state's shapes (ViT-B-32: 512/12/8 text, 768/12/12 vision, 512 out).

    open_clip's ViT-B-32 uses exact GELU (not quick_gelu) and LayerNorm eps 1e-5. ``max_length`` 77: without
    it Infinity reads ``PretrainedConfig``'s generation default (20) and truncates texts to 20 tokens.
    """
    width, vwidth = state["token_embedding.weight"].shape[1], state["visual.conv1.weight"].shape[0]
    common = {"hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": state["text_projection"].shape[1]}
    text = {"hidden_size": width, "intermediate_size": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "num_attention_heads": width // 64, "num_hidden_layers": _layers(state, "transformer.resblocks."),
            "max_position_embeddings": state["positional_embedding"].shape[0],
            "vocab_size": state["token_embedding.weight"].shape[0], "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 1, **common}
    patch = state["visual.conv1.weight"].shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vision = {"hidden_size": vwidth, "intermediate_size": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
              "num_attention_heads": vwidth // 64, "num_hidden_layers": _layers(state, "visual.transformer.resblocks."),
              "image_size": grid * patch, "patch_size": patch, "num_channels": 3, **common}
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": common["projection_dim"],
            "logit_scale_init_value": 2.6592, "torch_dtype": "float32", "max_length": text["max_position_embeddings"],
            "text_config": text, "vision_config": vision}


def _tokenizer_files(out: Path) -> None:
    """vocab.json + merges.txt from open_clip's BPE file, built as ``open_clip.tokenizer.SimpleTokenizer`` does."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as f:
        merges = f.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    base = list(bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # open_clip's <start_of_text>/<end_of_text>: same ids
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "processor_class": "CLIPProcessor", "model_max_length": 77,
        "do_lower_case": True, "errors": "replace", "add_prefix_space": False, **special}))


def write_hf_clip(state: Mapping[str, Any], out: Path) -> Path:
    """Write a transformers CLIP directory (config, safetensors, tokenizer, 224 px processor) of ``state``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = clip_config(state)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    save_file(convert_state(state), str(out / "model.safetensors"), metadata={"format": "pt"})
    _tokenizer_files(out)
    size = config["vision_config"]["image_size"]
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor", "do_resize": True,
        "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True,
        "crop_size": {"height": size, "width": size}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(OPENAI_MEAN), "image_std": list(OPENAI_STD),
        "do_convert_rgb": True}, indent=1))
    return out


# Run by Infinity's python: save the fast tokenizer (tokenizer.json) the way transformers writes it, then
# the token ids and unnormalised text/image features for the check. Images: a fixed pixel tensor.
_HF_SCRIPT = r"""
import json, sys, torch, transformers, infinity_emb
from transformers import AutoModel, AutoProcessor
d, texts = sys.argv[1], json.loads(sys.argv[2])
threads = torch.get_num_threads()
proc = AutoProcessor.from_pretrained(d); proc.save_pretrained(d)
model = AutoModel.from_pretrained(d).eval()
batch = proc(text=texts, return_tensors="pt", padding=True)
pixels = torch.sin(torch.arange(2 * 3 * 224 * 224, dtype=torch.float32) * 1e-3).reshape(2, 3, 224, 224)
with torch.no_grad():
    t, i = model.get_text_features(**batch), model.get_image_features(pixel_values=pixels)
print(json.dumps({"ids": [proc.tokenizer(x)["input_ids"] for x in texts], "text": t.tolist(), "image": i.tolist(),
                  "tokenizer": type(proc.tokenizer).__name__, "torch_threads": threads, "torch": torch.__version__,
                  "transformers": transformers.__version__,
                  "infinity_emb": getattr(infinity_emb, "__version__", "?")}))
"""


def cosines(a: Any, b: Any) -> list[float]:
    """Row-wise cosine similarity of two (N, D) arrays."""
    import torch

    return [float(x) for x in torch.nn.functional.cosine_similarity(torch.as_tensor(a), torch.as_tensor(b), dim=-1)]


def openclip_features(state: Mapping[str, Any], texts: Sequence[str], arch: str = "ViT-B-32") -> dict[str, Any]:
    """open_clip on ``state``: token ids up to end-of-text, unnormalised ``encode_text`` of ``texts`` and
    ``encode_image`` of the fixed pixel tensor of ``_HF_SCRIPT``."""
    import open_clip
    import torch

    model = open_clip.create_model(arch)
    model.load_state_dict(dict(state))
    model.eval()
    tokens = open_clip.get_tokenizer(arch)(list(texts))
    pixels = torch.sin(torch.arange(2 * 3 * 224 * 224, dtype=torch.float32) * 1e-3).reshape(2, 3, 224, 224)
    with torch.inference_mode():
        text, image = model.encode_text(tokens), model.encode_image(pixels)
    return {"ids": [row[:row.index(49407) + 1] for row in tokens.tolist()], "text": text, "image": image}


def finish_and_check(venv: Path, model_dir: Path, reference: Mapping[str, Any], texts: Sequence[str]) -> dict[str, Any]:
    """Let transformers (Infinity's venv) write the fast tokenizer; compare with open_clip on ``texts``.

    ``reference``: :func:`openclip_features` of the same texts. Returns the versions and torch thread default
    in Infinity's venv, ``token_ids_equal`` (transformers' ids against open_clip's) and the minimum cosine of
    unnormalised text and image features (``get_text_features``/``get_image_features`` against
    ``encode_text``/``encode_image``).
    """
    out = subprocess.run([str(venv / "bin" / "python"), "-c", _HF_SCRIPT, str(model_dir), json.dumps(list(texts))],
                         check=False, capture_output=True, text=True, env=infinity_env(), timeout=600)
    if out.returncode:
        raise RuntimeError(f"transformers could not load {model_dir}: {out.stderr[-2000:]}")
    hf = json.loads(out.stdout.strip().splitlines()[-1])
    return {"token_ids_equal": reference["ids"] == hf["ids"], "texts_checked": len(texts),
            "text_min_cosine": min(cosines(reference["text"], hf["text"])),
            "image_min_cosine": min(cosines(reference["image"], hf["image"])),
            **{k: hf[k] for k in ("tokenizer", "torch_threads", "torch", "transformers", "infinity_emb")}}


def infinity_env() -> dict[str, str]:
    """The caller's environment, offline and without telemetry; no PYTHONPATH into the project's venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return env | ENV


def command(venv: Path, model_dir: Path, port: int) -> list[str]:
    """The Infinity command line (``FLAGS`` plus model and port)."""
    return [str(venv / "bin" / "infinity_emb"), "v2", "--model-id", str(model_dir), "--port", str(port), *FLAGS]


def _tail(path: Path, n: int = 3000) -> str:
    with contextlib.suppress(OSError):
        return path.read_bytes()[-n:].decode("utf-8", "replace")
    return ""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (its compile workers too), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)


@contextlib.contextmanager
def spawned_infinity(venv: Path, model_dir: Path, port: int | None = None, *, ready_timeout_s: float = 900.0,
                     log_path: Path | None = None) -> Iterator[str]:
    """Start Infinity on ``model_dir`` (loopback ``port``, a free one by default); yield its base URL when
    ``/health`` and ``/v1/models`` answer; stop it (terminate, then kill) on exit."""
    from benchmarks.loadtest import _free_port

    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = command(venv, model_dir, port)
    with contextlib.ExitStack() as stack:
        if log_path is None:
            log_path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="infinity-"))) / "server.log"
        log = stack.enter_context(open(log_path, "wb"))
        proc = subprocess.Popen(cmd, env=infinity_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + ready_timeout_s
            while not _ready(url):
                if proc.poll() is not None:
                    raise RuntimeError(f"Infinity exited with code {proc.returncode} before it was ready "
                                       f"({' '.join(cmd)}):\n{_tail(log_path)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Infinity not ready within {ready_timeout_s:.0f}s:\n{_tail(log_path)}")
                time.sleep(0.5)
            yield url
        finally:
            _stop(proc)


def _ready(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return (httpx.get(f"{url}/health", timeout=5).status_code == 200
                and httpx.get(f"{url}/v1/models", timeout=5).status_code == 200)
    return False


def embed(url: str, texts: Sequence[str]) -> list[list[float]]:
    """One ``/v1/embeddings`` request: the embeddings, in input order."""
    body = httpx.post(f"{url}/v1/embeddings", json={"model": SERVED_NAME, "input": list(texts)}, timeout=120)
    body.raise_for_status()
    return [d["embedding"] for d in sorted(body.json()["data"], key=lambda d: int(d["index"]))]


def distinct_embeddings(url: str, texts: Sequence[str], clients: int, requests: int) -> dict[str, int]:
    """``requests`` identical requests from ``clients`` threads: how many distinct embedding lists came back.

    ``run_loadtest``'s ``distinct_answers`` hashes whole bodies, and Infinity's carry a fresh ``id`` and
    ``created`` each, so it counts requests there; this counts the ``data`` (the embeddings) only.
    """
    from concurrent.futures import ThreadPoolExecutor

    def one(_: int) -> str:
        return json.dumps(embed(url, texts))

    with ThreadPoolExecutor(clients) as pool:
        got = list(pool.map(one, range(requests)))
    return {"requests": len(got), "distinct": len(set(got))}
