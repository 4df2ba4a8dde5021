"""Export a trained HarmoniFuse experiment as one self-contained folder to share (no base LM needed).

    python -m tools.export_harmonifuse exp/harmonifuse/full/1986 harmonifuse_export [--lm_source /models/lm]

``<exp>`` is an experiment folder with its shared artefacts (``speech_modules.json``, written by train.py after
the test; ``lobes.harmonifuse.artefacts``). The folder then holds

- ``lm/``: the LM in transformers' format with its tokenizer: the LoRA adapters merged into the base
  (peft ``merge_and_unload``), the fine-tuned LM (``lm_mode: full``) or the base itself (``frozen``);
- ``speech_modules.safetensors`` + ``speech_modules.json``: the speech-side modules, the WavLM always (also a
  frozen one), and how to rebuild the model (``lm`` kind ``model`` in ``lm/``) and decode it as the experiment's
  test did;
- ``README.md``: the model card (hub metadata from ``huggingface_hub.ModelCardData``, the experiment's setup,
  test metrics with CIs, fusion weights) with the loading snippet, which ``tests/test_harmonifuse_export.py``
  runs as written.

``--lm_source`` / ``--wavlm_source``: where the experiment's base LM / frozen WavLM are now, when they moved.
"""
import argparse
import importlib.util
import sys
from pathlib import Path

from lobes.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
CARD_SCRIPT = ROOT / "recipes/MSP-Podcast/harmonifuse/model_card.py"


def _card_module():
    spec = importlib.util.spec_from_file_location("harmonifuse_model_card", CARD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def export_harmonifuse(exp_dir, out_dir, lm_source=None, wavlm_source=None):
    """Write the folder (module doc) for the experiment ``exp_dir`` into ``out_dir`` (replaced only when an
    earlier export made it); returns ``out_dir``."""
    from lobes.harmonifuse import artefacts as A
    from lobes.io_utils import atomic_dir

    exp_dir = Path(exp_dir)
    if not (exp_dir / A.INFO_FILE).is_file():
        raise DataError(f"{exp_dir}: no {A.INFO_FILE}; export an experiment tested by this toolkit's train.py "
                        "(it writes the shared artefacts after the test)")
    model, info = A.load_artefacts(exp_dir, lm_source, wavlm_source)
    card = _card_module()
    with atomic_dir(out_dir, A.INFO_FILE, "tools.export_harmonifuse") as stage:
        if hasattr(model.lm, "merge_and_unload"):  # a PeftModel: fold the adapters into the base weights
            model.lm = model.lm.merge_and_unload()
        A.save_lm_dir(model.hf_lm, model.tokenizer, stage / A.LM_DIR)
        lm = {"kind": "model", "dir": A.LM_DIR, "base": info["lm"]["base"],
              "trained_mode": info["lm"]["trained_mode"], "merged": info["lm"]["kind"] == "adapter"}
        A.write_speech_modules(model, stage, lm, info["decoding"], include_encoder=True)
        (stage / "README.md").write_text(card.export_card(exp_dir, out_dir))
    return Path(out_dir)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exp", help="HarmoniFuse experiment folder (with speech_modules.json)")
    p.add_argument("out", help="folder to write (replaced only when an earlier export made it)")
    p.add_argument("--lm_source", help="where the experiment's base LM is now, when it moved")
    p.add_argument("--wavlm_source", help="where the experiment's frozen WavLM is now, when it moved")
    a = p.parse_args(argv)
    try:
        out = export_harmonifuse(a.exp, a.out, a.lm_source, a.wavlm_source)
    except (DataError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
