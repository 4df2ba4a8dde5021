"""Write a tiny, randomly initialised WavLM as a ``save_pretrained`` directory.

It stands in for ``microsoft/wavlm-large`` in tests and the demo: same class (``WavLMModel``), same key
names and the same stable-layer-norm layout as WavLM-Large, only small. Recipes load it through the very
same ``wavlm_source:`` code path as a hub id.

    python -m tools.make_tiny_wavlm --out data/tiny_wavlm [--layers 4] [--seed 0]
"""
import argparse
import json
from pathlib import Path

import torch
from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel

CONFIG = Path(__file__).parent / "tiny_configs" / "wavlm.json"


def make_tiny_wavlm(out, seed=0, num_layers=None, hidden_size=None, overwrite=False):
    """Create (or reuse) the tiny WavLM directory ``out``; returns its path."""
    out = Path(out)
    if (out / "config.json").exists() and not overwrite:
        return out
    cfg = json.loads(CONFIG.read_text())
    cfg.pop("model_type", None)
    if num_layers is not None:
        cfg["num_hidden_layers"] = num_layers
    if hidden_size is not None:
        cfg["hidden_size"] = hidden_size
        cfg["intermediate_size"] = 2 * hidden_size
    torch.manual_seed(seed)
    model = WavLMModel(WavLMConfig(**cfg))
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    # the same preprocessor config as WavLM-Large, so loaders that expect one (e.g. SpeechBrain's) work offline
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(tmp)
    tmp.replace(out) if not out.exists() else None
    if tmp.exists():  # out existed (overwrite=True): swap file by file
        for f in tmp.iterdir():
            f.replace(out / f.name)
        tmp.rmdir()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    print(make_tiny_wavlm(a.out, a.seed, a.layers, overwrite=a.overwrite))


if __name__ == "__main__":
    main()
