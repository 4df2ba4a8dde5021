"""Write a tiny, randomly initialised causal LM (LLaMA layout) plus a character tokenizer.

It stands in for the HarmoniFuse text LM in tests and the demo: ``SpeechLM(encoder, lm=DIR)`` loads it through
the same ``AutoModelForCausalLM.from_pretrained`` path as a real checkpoint; ``char_tokenizer.json`` makes
``lobes.harmonifuse.lm_loading.load_tokenizer`` pick :class:`lobes.harmonifuse.lm_loading.CharTokenizer` (no download).

    python -m tools.make_tiny_lm --out data/tiny_lm [--layers 4] [--seed 0] [--overwrite]
"""
import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lobes.errors import DataError
from lobes.harmonifuse.lm_loading import CHAR_TOKENIZER_FILE, CharTokenizer

CONFIG = Path(__file__).parent / "tiny_configs" / "causal_lm.json"


def make_tiny_lm(out, seed=0, num_layers=None, overwrite=False):
    """Create (or reuse) the tiny LM directory ``out``; returns its path."""
    out = Path(out)
    if (out / "config.json").exists() and (out / CHAR_TOKENIZER_FILE).exists() and not overwrite:
        return out
    cfg = json.loads(CONFIG.read_text())
    model_type = cfg.pop("model_type")
    if num_layers is not None:
        cfg["num_hidden_layers"] = int(num_layers)
    tokenizer = CharTokenizer()
    if len(tokenizer) > cfg["vocab_size"]:
        raise DataError(f"{CONFIG}: vocab_size {cfg['vocab_size']} < {len(tokenizer)} tokenizer symbols")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
    # Build next to the target and swap in whole, so a crash never leaves a half-written model dir.
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    print(make_tiny_lm(a.out, a.seed, a.layers, overwrite=a.overwrite))


if __name__ == "__main__":
    main()
