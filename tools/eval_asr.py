"""Evaluate a CTC ASR model on a manifest: the WER reference rows of the ASR source models (paper §3.1).

    python -m tools.eval_asr --exp exp/adaltm_recipe/asr_ctc_msp --manifest prep/msp/test.json \
        --out results/sources/asr_in/metrics.json
    python -m tools.eval_asr --hf_ctc patrickvonplaten/wavlm-libri-clean-100h-large --manifest prep/msp/test.json \
        --out results/sources/asr_out/metrics.json --device cuda:0

Two kinds of model, greedy (best-path) CTC decoding for both, as the recipes decode:

``--exp DIR``
    An experiment folder of our ASR-CTC recipes (MSP-Podcast or LibriSpeech ``asr_ctc``): the fine-tuned backbone
    exported to ``DIR/finetuned_wavlm`` and the CTC head (``ctc_head.ckpt``) of the checkpoint with the lowest
    validation loss in ``DIR/save`` - the model the recipe itself tested. Vocabulary: ``lobes.ctc_text.VOCAB``.
``--hf_ctc SOURCE``
    A transformers ``WavLMForCTC`` directory or hub id with its CTC tokenizer (``vocab.json``), e.g. the paper's
    out-of-domain model. Its own vocabulary and blank (the tokenizer's pad token) are used; transformers'
    ``Wav2Vec2CTCTokenizer.decode`` merges repeats and drops blanks; its unknown token is dropped.

Hypotheses and references (the manifest's ``wrd``) both go through ``lobes.ctc_text.normalize_transcript``;
the WER is pooled over utterances (jiwer, ``lobes.metrics.wer_details``). Writes ``--out`` (metrics.json, atomic):
``{"experiment", "model", "kind", "manifest", "n", "wer", "wer_details", "wer_ci", "wer_whisper_norm",
"asr_examples"}``, which
``tools.collect_results --source`` places as a reference row, and beside it ``asr_predictions.csv`` (id, ref, hyp
of every utterance, ``lobes.collectors.write_asr_predictions``) for the paired WER test of ``tools.compare_rows``.
Utterances are batched by duration (``--batch_size``); padding does not change a hypothesis (attention and frame
masks), the test checks it against batch size 1.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from lobes import ctc_text
from lobes import metrics as M
from lobes.audio import read_audio
from lobes.collectors import write_asr_predictions
from lobes.errors import DataError
from lobes.inference import best_checkpoint
from lobes.wavlm_encoder import load_wavlm, run_wavlm


class RecipeCTC(torch.nn.Module):
    """Our ASR-CTC recipes' model: WavLM (last hidden state) -> linear CTC head over ``lobes.ctc_text.VOCAB``."""

    def __init__(self, exp_dir):
        super().__init__()
        exp_dir = Path(exp_dir)
        backbone = exp_dir / "finetuned_wavlm"
        if not (backbone / "config.json").is_file():
            raise DataError(f"{backbone}: no exported fine-tuned WavLM (the ASR recipe writes it after testing)")
        self.wavlm = load_wavlm(str(backbone))
        head_file = best_checkpoint(exp_dir / "save").path / "ctc_head.ckpt"
        if not head_file.is_file():
            raise DataError(f"{head_file}: not found (the ASR recipe checkpoints its CTC head as 'ctc_head')")
        state = torch.load(head_file, map_location="cpu", weights_only=True)
        if set(state) != {"weight", "bias"} or state["weight"].shape[0] != len(ctc_text.VOCAB):
            raise DataError(f"{head_file}: expected a Linear CTC head with {len(ctc_text.VOCAB)} outputs, got "
                            f"{ {k: tuple(v.shape) for k, v in state.items()} }")
        self.head = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        self.head.load_state_dict(state)
        self.normalize_wav = True  # WavLMEncoder's default in every ASR recipe
        self.source = str(exp_dir)

    def decode(self, log_probs, lengths):
        return ctc_text.ctc_greedy_decode(log_probs, lengths, blank=ctc_text.CHAR_TO_INDEX[ctc_text.BLANK])


class HFCTC(torch.nn.Module):
    """A transformers ``WavLMForCTC`` with its own tokenizer (vocabulary, blank = pad token)."""

    def __init__(self, source):
        super().__init__()
        from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, WavLMForCTC

        try:
            model, loading = WavLMForCTC.from_pretrained(source, output_loading_info=True)
            self.tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise DataError(f"{source}: not a WavLMForCTC with a CTC tokenizer (config.json, vocab.json): {e}") from e
        missing = [k for k in loading["missing_keys"] if k.startswith("lm_head")]
        if missing:  # from_pretrained would silently give a random head: a backbone-only checkpoint has no WER
            raise DataError(f"{source}: holds no CTC head ({missing} not in the checkpoint)")
        # vocab.json tokens, plus the tokens transformers adds (<s>, </s>), which some heads cover and some do not
        if not self.tokenizer.vocab_size <= model.lm_head.out_features <= len(self.tokenizer):
            raise DataError(f"{source}: CTC head has {model.lm_head.out_features} outputs but the tokenizer "
                            f"{self.tokenizer.vocab_size} tokens ({len(self.tokenizer)} with added ones)")
        self.wavlm, self.head = model.wavlm, model.lm_head
        try:  # the model's own input normalisation (WavLM-Large checkpoints: do_normalize=True)
            self.normalize_wav = bool(Wav2Vec2FeatureExtractor.from_pretrained(source).do_normalize)
        except (OSError, ValueError):
            self.normalize_wav = True
        self.source = str(source)

    def decode(self, log_probs, lengths):
        ids = log_probs.argmax(-1)
        unk = self.tokenizer.unk_token
        texts = [self.tokenizer.decode(ids[b, : int(lengths[b])].tolist()) for b in range(ids.shape[0])]
        return [t.replace(unk, "") if unk else t for t in texts]


def load_model(exp=None, hf_ctc=None):
    if (exp is None) == (hf_ctc is None):
        raise DataError("give exactly one of --exp (our ASR recipe's folder) or --hf_ctc (a WavLMForCTC)")
    return RecipeCTC(exp) if exp is not None else HFCTC(hf_ctc)


def read_manifest(path):
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the manifest ({e})") from e
    missing = [k for k, v in data.items() if not isinstance(v, dict) or "wav" not in v or "wrd" not in v]
    if missing:
        raise DataError(f"{path}: {len(missing)} entries without 'wav' and 'wrd' (e.g. {missing[:3]}); "
                        "prepare with transcripts (transcript_only)")
    if not data:
        raise DataError(f"{path}: empty manifest")
    return data


@torch.no_grad()
def transcribe(model, manifest, batch_size=8, device="cpu"):
    """``{utt_id: hypothesis}`` (normalised) for every entry of ``manifest``, in duration-sorted batches."""
    model.eval().to(device)
    ids = sorted(manifest, key=lambda k: (float(manifest[k].get("duration", 0.0)), k))
    hyps = {}
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        wavs = [read_audio(manifest[k]["wav"]) for k in chunk]
        longest = max(w.shape[0] for w in wavs)
        batch = torch.zeros(len(wavs), longest)
        for i, w in enumerate(wavs):
            batch[i, : w.shape[0]] = w
        rel = torch.tensor([w.shape[0] / longest for w in wavs])
        hidden, mask = run_wavlm(model.wavlm, batch.to(device), rel.to(device), normalize=model.normalize_wav)
        log_probs = torch.log_softmax(model.head(hidden[-1]).float(), dim=-1)
        for k, text in zip(chunk, model.decode(log_probs.cpu(), mask.sum(1).cpu())):
            hyps[k] = ctc_text.normalize_transcript(text)
    return hyps


def evaluate(manifest_path, out, exp=None, hf_ctc=None, batch_size=8, device="cpu", experiment=None):
    """Transcribe, score and write ``out`` (metrics.json); returns the metrics dict."""
    manifest = read_manifest(manifest_path)
    model = load_model(exp, hf_ctc)
    hyps = transcribe(model, manifest, batch_size=batch_size, device=device)
    ids = list(manifest)
    refs = [ctc_text.normalize_transcript(manifest[k]["wrd"]) for k in ids]
    details = M.wer_details(refs, [hyps[k] for k in ids])
    metrics = {
        "experiment": experiment or Path(str(exp or hf_ctc)).name,
        "model": model.source, "kind": "exp" if exp is not None else "hf_ctc",
        "manifest": str(manifest_path), "n": len(ids), "wer": details["wer"], "wer_details": details,
        "wer_ci": M.wer_ci(refs, [hyps[k] for k in ids])[1],  # 95% utterance bootstrap, 1000 sets
        # the same hypotheses scored as ASR papers do (Whisper's English normaliser on both sides)
        "wer_whisper_norm": M.wer_whisper_norm([manifest[k]["wrd"] for k in ids], [hyps[k] for k in ids]),
        "asr_examples": [{"id": k, "ref": r, "hyp": hyps[k]} for k, r in list(zip(ids, refs))[:5]],
    }
    M.write_metrics(out, metrics)
    # beside it, every transcript: tools.compare_rows pairs them with a row's for the matched-pair WER test
    write_asr_predictions(Path(out).parent / "asr_predictions.csv",
                          {"ids": ids, "refs": refs, "hyps": [hyps[k] for k in ids]})
    return metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--exp", help="experiment folder of our ASR-CTC recipe (finetuned_wavlm/ and save/)")
    model.add_argument("--hf_ctc", help="WavLMForCTC directory or hub id (with its tokenizer)")
    parser.add_argument("--manifest", required=True, help="manifest JSON with wav and wrd (e.g. prep/msp/test.json)")
    parser.add_argument("--out", required=True, help="metrics.json to write")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu, cuda:0, ...")
    parser.add_argument("--experiment", help="name recorded in metrics.json (default: the model folder's name)")
    args = parser.parse_args(argv)
    try:
        m = evaluate(args.manifest, args.out, exp=args.exp, hf_ctc=args.hf_ctc, batch_size=args.batch_size,
                     device=args.device, experiment=args.experiment)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"WER {100 * m['wer']:.2f}% on {m['n']} utterances of {args.manifest} ({m['model']}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
