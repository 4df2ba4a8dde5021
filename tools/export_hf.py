"""Export an emotion model as one folder that transformers and SpeechBrain users load offline with their own tools.

    python -m tools.export_hf exp/adaltm/setup4_dual/1986 exp/adaltm/setup4_dual/1986/hf_export
    python -m tools.export_hf exp/adaltm/setup4_dual/1986/folded_wavlm hf_export/   # a folded AdaLTM export

``<model>`` is what ``tools.infer --model`` takes: an SER / MTL / AdaLTM experiment (AdaLTM's λ folded into the
weights; MTL's CTC head is left out) or a folded AdaLTM export. The folder then holds

- ``config.json``: WavLM's configuration, ``id2label`` from the recipe's ``emotion_classes``, the layer sum
  (``layer_sum``) and head (``emotion_head``) settings, and an ``auto_map`` to ``modeling_wavlm_emotion.py``;
- ``model.safetensors``: WavLM (``wavlm.*``), the α logits (``layer_weights``) and the head (``head.*``);
- ``preprocessor_config.json``: a ``Wav2Vec2FeatureExtractor`` at 16 kHz whose ``do_normalize`` is the recipe's
  ``normalize_wav`` (per-utterance zero mean, unit variance, eps 1e-7, as ``lobes.wavlm_encoder``);
- ``hyperparams.yaml`` + ``custom_interface.py``: SpeechBrain's ``foreign_class`` interface over the same files.

    AutoModelForAudioClassification.from_pretrained(out, trust_remote_code=True)
    pipeline("audio-classification", model=out, trust_remote_code=True)
    foreign_class(source=out, pymodule_file="custom_interface.py", classname="EmotionClassifier")

Why remote code: no head of the recipes is structurally ``WavLMForSequenceClassification`` (a projector, masked
mean pooling and ONE linear classifier, no nonlinearity, over the last layer or a softmax sum of all L+1 hidden
states). ``lobes.ser_head.SERHead`` always ends in a two-layer MLP with a ReLU (and ``frame_mlp`` adds a ReLU per
frame, ``mean_std`` std pooling), and the AdaLTM layer sum leaves the CNN output out by default, so the stock class
cannot hold any of them. The export checks itself: the folder, loaded back through transformers, must give the
toolkit's probabilities on a fixed test signal (``VERIFY_TOL``), or no folder is left.
"""
import argparse
import logging
import shutil
import sys
from pathlib import Path

import torch

from lobes.errors import DataError

TEMPLATE = Path(__file__).resolve().parent / "hf_export_template"
SAMPLE_RATE = 16000
VERIFY_TOL = 1e-4  # float32 kernels differ by ~1e-7 here; a wrong weight or setting moves probabilities by >1e-2
SPEECHBRAIN_YAML = """\
# SpeechBrain interface of this folder (python -m tools.export_hf):
#   from speechbrain.inference.interfaces import foreign_class
#   classifier = foreign_class(source="<this folder>", pymodule_file="custom_interface.py",
#                              classname="EmotionClassifier")
#   out_prob, score, index, label = classifier.classify_file("speech.wav")
# The model and its weights are the transformers files beside this one: EmotionClassifier loads them (safetensors).
sample_rate: {sample_rate}
audio_normalizer: !new:speechbrain.dataio.preprocess.AudioNormalizer
    sample_rate: !ref <sample_rate>
    mix: avg-to-mono
modules: {{}}
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
"""


def _template_module():
    from tools.hf_export_template import modeling_wavlm_emotion

    return modeling_wavlm_emotion


def emotion_parts(recognizer, source):
    """(WavLMModel, WeightedLayerSum, SERHead, normalize_wav, classes) of a loaded model; DataError naming
    ``source`` when it has no emotion head or no plain WavLM to export."""
    from transformers import WavLMModel

    if not recognizer.has_ser:
        raise DataError(f"{source}: has no emotion head (ser_head) to export for audio classification")
    encoder = recognizer.modules["encoder"]
    wavlm = getattr(encoder, "model", None)
    if not isinstance(wavlm, WavLMModel) or not hasattr(encoder, "normalize_wav"):
        raise DataError(f"{source}: its encoder ({type(encoder).__name__}) is not a plain WavLM; AdaLTM "
                        "experiments are exported with λ folded in")
    return (wavlm, recognizer.modules["weighted_sum"], recognizer.modules["ser_head"], bool(encoder.normalize_wav),
            list(recognizer.classes))


def build_hf_model(wavlm, weighted_sum, ser_head, classes):
    """The transformers model (``modeling_wavlm_emotion``) holding exactly these weights."""
    mod = _template_module()
    head = dict(ser_head.config)
    if head.pop("input_size") != wavlm.config.hidden_size or head.pop("num_classes") != len(classes):
        raise DataError(f"the emotion head {ser_head.config} does not fit WavLM's width "
                        f"{wavlm.config.hidden_size} and the {len(classes)} classes {classes}")
    skip = {"model_type", "architectures", "auto_map", "id2label", "label2id", "num_labels", "transformers_version",
            "_name_or_path"}
    base = {k: v for k, v in wavlm.config.to_dict().items() if k not in skip}
    config = mod.WavLMEmotionConfig(
        **base, layer_sum={"include_cnn": bool(weighted_sum.include_cnn), "layer_norm": bool(weighted_sum.layer_norm)},
        emotion_head=head, id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)},
        auto_map={"AutoConfig": "modeling_wavlm_emotion.WavLMEmotionConfig",
                  "AutoModelForAudioClassification": "modeling_wavlm_emotion.WavLMForEmotionClassification"})
    model = mod.WavLMForEmotionClassification(config)
    state = {f"wavlm.{k}": v for k, v in wavlm.state_dict().items()}
    state["layer_weights"] = weighted_sum.weights.detach()
    state.update({f"head.{k}": v for k, v in ser_head.state_dict().items()})
    model.load_state_dict(state, strict=True)
    return model.eval()


def _test_signal(seconds=1.5):
    """A fixed, speech-length test input: two tones and noise (seeded), not silence."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return 0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.1 * torch.sin(2 * torch.pi * 1250 * t) + \
        0.05 * torch.randn(t.numel(), generator=g)


def verify(folder, recognizer):
    """Max |Δp| between the folder loaded through transformers (feature extractor included) and ``recognizer``."""
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    wav = _test_signal()
    want, _ = recognizer.forward(wav[None], torch.ones(1))
    model = AutoModelForAudioClassification.from_pretrained(str(folder), trust_remote_code=True).eval()
    feats = AutoFeatureExtractor.from_pretrained(str(folder))(wav.numpy(), sampling_rate=SAMPLE_RATE,
                                                             return_tensors="pt")
    with torch.no_grad():
        got = torch.softmax(model(**feats).logits.float(), dim=-1)
    return float((got - want).abs().max())


def export_hf(model_path, out_dir, overrides=None):
    """Write the folder (see the module docstring) for ``model_path`` into ``out_dir``; returns ``out_dir``."""
    from transformers import Wav2Vec2FeatureExtractor

    from tools.infer import load_model

    recognizer = load_model(model_path, overrides=overrides, fold=True)
    wavlm, weighted_sum, ser_head, normalize_wav, classes = emotion_parts(recognizer, model_path)
    if recognizer.has_ctc:
        logging.getLogger(__name__).info("%s: the CTC head is not part of the audio-classification export",
                                         model_path)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_hf_model(wavlm, weighted_sum, ser_head, classes).save_pretrained(tmp, safe_serialization=True)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                             do_normalize=normalize_wav, return_attention_mask=True).save_pretrained(tmp)
    for name in ("modeling_wavlm_emotion.py", "custom_interface.py"):
        shutil.copy(TEMPLATE / name, tmp / name)
    (tmp / "hyperparams.yaml").write_text(SPEECHBRAIN_YAML.format(sample_rate=SAMPLE_RATE))
    diff = verify(tmp, recognizer)
    if diff > VERIFY_TOL:
        shutil.rmtree(tmp)
        raise DataError(f"{model_path}: the exported model differs from the toolkit's by {diff:.2e} in probability "
                        f"(> {VERIFY_TOL}); nothing written to {out_dir}")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="experiment directory or folded AdaLTM export (as tools.infer --model)")
    p.add_argument("out", help="folder to write (replaced if it exists)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = export_hf(a.model, a.out)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
