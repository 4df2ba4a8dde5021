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

Self-check: before the folder is renamed into place, it is loaded back as the card's snippet does
(``load_artefacts(<export>)``, the LM from its ``lm/``) and compared with the trained model as the test stage
scored it, the experiment's best SpeechBrain checkpoint (``lobes.inference.load_experiment``; the experiment's
shared artefacts where ``save/`` holds none), on a fixed input (:func:`fixed_batch`): for every trained task the
teacher-forced next-token probabilities of fixed targets (a transcript; the class words) and, for SER, the class
scores of ``lobes.harmonifuse.predict.emotion_scores``, all as log-probabilities. A largest difference above
:data:`VERIFY_TOL` (for the LM's dtype) is an error (exit 2) and nothing is written or replaced.

``--push_to_hub REPO``: after the self-check passed, the folder is uploaded to the hub model repo REPO as one
commit (``tools.model_card.upload_to_hub``); needs a hub token. Nothing is uploaded when the check fails.
"""
import argparse
import gc
import importlib.util
import logging
import sys
from pathlib import Path

import torch

from lobes.errors import DataError

logger = logging.getLogger(__name__)
# Largest |Δ log p| (natural log, over the whole vocabulary / class set) allowed between the export and the
# checkpoint, per LM dtype. Log-probabilities, not probabilities: a near-uniform distribution (a large vocabulary,
# an untrained model) moves by ~1e-8 in probability under a corrupted weight, in log-probability by its relative
# change. float32: merging the LoRA into the weights (merge_and_unload) only reorders float32 sums (~1e-7
# relative per product): measured 4.8e-7 on the tiny fixture LM (2 layers); 1e-4 leaves a factor 200 for a deep
# LM, and on the tiny model one adapter weight moved by 0.1 shows as 3.4e-3, by 1.0 as 3.3e-2, a whole adapter
# matrix scaled by 1.01 as 6.8e-4, one LM down_proj weight moved by 0.1 as 6.6e-4 (all refused).
# bfloat16 / float16: the merged weight W + B·A·s is rounded once to 8 / 11 mantissa bits where the checkpoint adds
# B·A·s to the rounded W at run time: measured 4.1e-3 (bf16) / 4.0e-4 (fp16) on the tiny LM; 0.1 allows ~25x that
# for depth and still refuses a missing, swapped or unmerged tensor (changes of order 1), not a small corruption.
VERIFY_TOL = {"float32": 1e-4, "float64": 1e-4, "bfloat16": 0.1, "float16": 0.1}
SAMPLE_RATE = 16000
ASR_TARGETS = ["THE QUICK BROWN FOX", "HELLO"]  # fixed teacher-forced transcripts: any text the tokenizer reads

ROOT = Path(__file__).resolve().parents[1]
CARD_SCRIPT = ROOT / "recipes/MSP-Podcast/harmonifuse/model_card.py"


def _card_module():
    spec = importlib.util.spec_from_file_location("harmonifuse_model_card", CARD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fixed_batch():
    """Two fixed utterances (1.5 s and 0.9 s, so padding and masks take part): tones plus seeded noise."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(int(1.5 * SAMPLE_RATE)) / SAMPLE_RATE
    tones = 0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.1 * torch.sin(2 * torch.pi * 1250 * t)
    wavs = tones + 0.05 * torch.randn(2, t.numel(), generator=g)
    wavs[1, int(0.9 * SAMPLE_RATE):] = 0.0
    return wavs, torch.tensor([1.0, 0.6])


@torch.no_grad()
def model_outputs(model, tasks):
    """{what: log-probabilities} of ``model`` on :func:`fixed_batch` for the trained ``tasks`` (module doc)."""
    from lobes.harmonifuse.predict import emotion_scores

    wavs, lens = fixed_batch()
    out = {}
    for task in tasks:
        if task == model.ser_task:
            out[f"{task} class scores"] = emotion_scores(model, wavs, lens).float().clamp_min(1e-30).log()
            if model._is_classify(task):
                continue
            targets = [model.emotions[0], model.emotions[-1]]
        else:
            targets = ASR_TARGETS
        res = model(wavs, lens, task, targets)
        logp = res.logits.float().log_softmax(-1)
        out[f"{task} token log-probabilities"] = logp * (res.target_ids != -100)[..., None]  # padding left out
    return out


def largest_difference(got, want):
    """(what, max |Δ log p|) over the outputs of :func:`model_outputs`; a shape mismatch counts as infinite."""
    diffs = {k: float((got[k] - want[k]).abs().max()) if got[k].shape == want[k].shape else float("inf")
             for k in want}
    worst = max(diffs, key=diffs.get)
    return worst, diffs[worst]


def reference_outputs(exp_dir, tasks, lm_source=None, wavlm_source=None):
    """:func:`model_outputs` of the trained model: the experiment's best checkpoint, else its shared artefacts."""
    from lobes.harmonifuse import artefacts as A
    from lobes.inference import load_experiment

    overrides = {}
    if lm_source:
        overrides["speech_lm"] = {"lm": {"source": lm_source}}
    if wavlm_source:
        overrides["wavlm"] = {"source": wavlm_source}
    try:
        exp = load_experiment(exp_dir, overrides or None, weights=["speech_lm"])
        model, source = exp.modules["speech_lm"].eval(), f"checkpoint {exp.checkpoint.path.name}"
    except DataError as e:
        if "no CKPT+" not in str(e):
            raise
        logger.warning("%s: no checkpoint (%s); checking the export against the shared artefacts", exp_dir, e)
        model, source = A.load_artefacts(exp_dir, lm_source, wavlm_source)[0], A.INFO_FILE
    return model_outputs(model, tasks), source


def self_check(exp_dir, stage, tasks, lm_dtype, lm_source=None, wavlm_source=None):
    """Load the staged export as a user would and compare it with the trained model (module doc); DataError
    above the tolerance. Returns {what, difference, tolerance, reference}."""
    from lobes.harmonifuse import artefacts as A

    want, source = reference_outputs(exp_dir, tasks, lm_source, wavlm_source)
    gc.collect()  # the reference model, held by reference cycles, freed before the export is loaded
    got = model_outputs(A.load_artefacts(stage)[0], tasks)
    what, diff = largest_difference(got, want)
    tol = VERIFY_TOL[lm_dtype]
    if not diff <= tol:
        raise DataError(f"{exp_dir}: the export differs from the trained model ({source}) by {diff:.2e} in {what} "
                        f"(> {tol:g} for a {lm_dtype} LM); nothing was written")
    logger.info("self-check: export vs %s, largest |Δ log p| %.2e (%s), tolerance %g", source, diff, what, tol)
    return {"what": what, "difference": diff, "tolerance": tol, "reference": source}


def export_harmonifuse(exp_dir, out_dir, lm_source=None, wavlm_source=None):
    """Write the folder (module doc) for the experiment ``exp_dir`` into ``out_dir`` (replaced only when an
    earlier export made it) once its self-check passed; returns (``out_dir``, the check's result)."""
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
        del model  # one model in memory at a time: the checkpoint and the export are loaded next
        gc.collect()  # the model's reference cycles would keep it (an LLM) until the collector's next full pass
        check = self_check(exp_dir, stage, info["decoding"]["train_tasks"], info["lm"]["dtype"], lm_source,
                           wavlm_source)
    return Path(out_dir), check


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exp", help="HarmoniFuse experiment folder (with speech_modules.json)")
    p.add_argument("out", help="folder to write (replaced only when an earlier export made it)")
    p.add_argument("--lm_source", help="where the experiment's base LM is now, when it moved")
    p.add_argument("--wavlm_source", help="where the experiment's frozen WavLM is now, when it moved")
    p.add_argument("--push_to_hub", metavar="REPO", default=None,
                   help="upload the checked export to this hub model repo (one commit); needs a hub token")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out, check = export_harmonifuse(a.exp, a.out, a.lm_source, a.wavlm_source)
    except (DataError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out}\tself-check: largest |Δ log p| {check['difference']:.2e} ({check['what']}) vs "
          f"{check['reference']}, tolerance {check['tolerance']:g}")
    if a.push_to_hub:
        from tools.model_card import upload_to_hub

        print(upload_to_hub(a.push_to_hub, _folder_files(out), f"HarmoniFuse export of {Path(a.exp).name}"))
    return 0


def _folder_files(folder):
    """{path in the repo: file} of every file under ``folder``."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


if __name__ == "__main__":
    sys.exit(main())
