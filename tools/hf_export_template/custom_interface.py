"""SpeechBrain interface of this folder (written by ``tools/export_hf.py`` beside the transformers files).

    from speechbrain.inference.interfaces import foreign_class
    classifier = foreign_class(source="this_folder", pymodule_file="custom_interface.py",
                               classname="EmotionClassifier")
    out_prob, score, index, label = classifier.classify_file("speech.wav")

The model is the folder's transformers model (``modeling_wavlm_emotion.py``, ``model.safetensors``) with its
feature extractor, so both libraries give the same probabilities. SpeechBrain's Pretrainer would read ``.ckpt``
pickles; the weights are safetensors, so ``load_model`` reads them itself.
"""
import os
from pathlib import Path

import torch
from speechbrain.inference.interfaces import Pretrained
from transformers import AutoFeatureExtractor, AutoModelForAudioClassification


def export_dir():
    """The folder holding config.json: this file's, or the one SpeechBrain linked this file from (``savedir``)."""
    here = Path(__file__).absolute()
    candidates = [here.parent]
    if here.is_symlink():
        candidates += [(here.parent / os.readlink(here)).parent, here.resolve().parent]
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(f"no config.json beside {here} (looked in {[str(c) for c in candidates]})")


def load_model():
    """The transformers model of this folder (its own code, safetensors weights), in eval mode."""
    return AutoModelForAudioClassification.from_pretrained(str(export_dir()), trust_remote_code=True).eval()


class EmotionClassifier(Pretrained):
    """Emotion of an utterance: ``classify_batch`` / ``classify_file`` return (class probabilities [B, C], best
    probability [B], best index [B], best labels), as SpeechBrain's emotion interfaces do."""

    MODULES_NEEDED = ["model"]

    def __init__(self, modules=None, hparams=None, **kwargs):
        # built here, not in hyperparams.yaml: importing "custom_interface" by name there could pick up another
        # export's module of the same name already imported in this process
        super().__init__({**(modules or {}), "model": load_model()}, hparams, **kwargs)
        self.feature_extractor = AutoFeatureExtractor.from_pretrained(str(export_dir()))
        self.labels = [self.mods.model.config.id2label[i] for i in range(self.mods.model.config.num_labels)]

    def classify_batch(self, wavs, wav_lens=None):
        """wavs [B, samples] at 16 kHz, wav_lens relative lengths (SpeechBrain's convention)."""
        if wav_lens is None:
            wav_lens = torch.ones(wavs.shape[0])
        n = torch.round(wav_lens.float() * wavs.shape[1]).long().tolist()
        # the feature extractor normalises each utterance over its own samples, as training did
        feats = self.feature_extractor([w[:k].cpu().numpy() for w, k in zip(wavs, n)], sampling_rate=16000,
                                       padding=True, return_attention_mask=True, return_tensors="pt")
        with torch.no_grad():
            logits = self.mods.model(feats["input_values"].to(self.device),
                                     attention_mask=feats["attention_mask"].to(self.device)).logits
        out_prob = torch.softmax(logits.float(), dim=-1)
        score, index = out_prob.max(dim=-1)
        return out_prob, score, index, [self.labels[i] for i in index.tolist()]

    def classify_file(self, path, savedir=None):
        wav = self.load_audio(path, savedir=savedir)  # mono, resampled to 16 kHz
        return self.classify_batch(wav.unsqueeze(0), torch.ones(1))

    def forward(self, wavs, wav_lens=None):
        return self.classify_batch(wavs, wav_lens)
