"""Train-loop pieces shared by every recipe's Brain subclass (written once, used everywhere).

- differential learning rates: ``opt_class`` for the head (and λ, α), ``backbone_opt_class`` for the modules
  named in ``backbone_modules`` (only parameters with ``requires_grad`` are given to an optimizer);
- a non-finite loss stops training at once with the batch's utterance ids, before any optimizer step or
  checkpoint, so NaN weights are never saved;
- SER / ASR output collection and the ``metrics.json`` writer used by every recipe's test stage;
- checkpointing on the validation loss (best = lowest, the paper's selection rule).
"""
import logging
import time
from pathlib import Path

import speechbrain as sb
import torch

from lobes import ctc_text
from lobes import metrics as M
from lobes.emotions import EMOTIONS

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Raised when a training loss is NaN/inf; names the batch so the culprit utterances can be found."""


class ToolkitBrain(sb.Brain):
    # -- optimisation ------------------------------------------------------------------------------------
    def init_optimizers(self):
        backbone_names = set(getattr(self.hparams, "backbone_modules", []) or [])
        backbone_opt = getattr(self.hparams, "backbone_opt_class", None)
        head, backbone = [], []
        for name, module in self.modules.items():
            params = [p for p in module.parameters() if p.requires_grad]
            (backbone if name in backbone_names and backbone_opt is not None else head).extend(params)
        self.optimizers_dict = {}
        if head:
            self.optimizer = self.opt_class(head)
            self.optimizers_dict["opt_class"] = self.optimizer
        if backbone:
            self.backbone_optimizer = backbone_opt(backbone)
            self.optimizers_dict["backbone_opt_class"] = self.backbone_optimizer
        if self.checkpointer is not None:
            for name, opt in self.optimizers_dict.items():
                self.checkpointer.add_recoverable(name, opt)

    def on_fit_batch_start(self, batch, should_step):
        self._batch_ids = list(getattr(batch, "id", []))

    def check_loss_isfinite(self, loss):
        if not torch.isfinite(loss):
            ids = getattr(self, "_batch_ids", [])
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at step {self.step} of epoch "
                f"{getattr(self.hparams.epoch_counter, 'current', '?')}; batch utterances: {', '.join(ids)}. "
                "Training stopped before the optimizer step; no checkpoint was written for it.")

    # -- shared forward passes ---------------------------------------------------------------------------
    def encode(self, batch):
        """Hidden states [L+1, B, T, D] and frame mask of the recipe's ``wavlm`` module."""
        wavs, lens = batch.sig
        return self.modules.wavlm(wavs, lens)

    def ser_logits(self, hidden, mask):
        """Eq. (5) weighted layer sum (α) followed by the emotion head."""
        return self.modules.ser_head(self.modules.weighted_sum(hidden), mask)

    def ctc_log_probs(self, hidden):
        """CTC head on the last hidden state -> log-probabilities [B, T, V]."""
        return torch.log_softmax(self.modules.ctc_head(hidden[-1]).float(), dim=-1)

    def ctc_loss(self, log_probs, mask, batch):
        tokens, rel = batch.tokens
        token_lens = torch.round(rel * tokens.shape[1]).long()
        return torch.nn.functional.ctc_loss(
            log_probs.transpose(0, 1), tokens, mask.sum(1), token_lens, blank=ctc_text.CHAR_TO_INDEX[ctc_text.BLANK],
            reduction="mean", zero_infinity=True)

    def ctc_hyps(self, log_probs, mask):
        return ctc_text.ctc_greedy_decode(log_probs.detach(), mask.sum(1))

    # -- output collection -------------------------------------------------------------------------------
    def reset_outputs(self):
        self.ser_out = {"ids": [], "true": [], "pred": [], "spk": [], "prob": []}
        self.asr_out = {"ids": [], "refs": [], "hyps": []}

    def collect_ser(self, batch, logits):
        probs = torch.softmax(logits.detach().float(), dim=-1).cpu()
        self.ser_out["ids"] += list(batch.id)
        self.ser_out["true"] += batch.emo_idx.data.view(-1).cpu().tolist()
        self.ser_out["pred"] += probs.argmax(-1).tolist()
        self.ser_out["prob"] += probs.tolist()
        spk = getattr(batch, "spk_id", None)
        self.ser_out["spk"] += list(spk) if spk is not None else []

    def collect_asr(self, batch, hyps):
        self.asr_out["ids"] += list(batch.id)
        self.asr_out["refs"] += list(batch.wrd)
        self.asr_out["hyps"] += list(hyps)

    def ser_stats(self, with_ci=False):
        if not self.ser_out["true"]:
            return {}
        if not with_ci:
            m = M.ser_metrics(self.ser_out["true"], self.ser_out["pred"], len(EMOTIONS))
            return {"UAR": round(100 * m["uar"], 2), "MaF1": round(100 * m["macro_f1"], 2)}
        speakers = self.ser_out["spk"] if getattr(self.hparams, "speaker_bootstrap", False) else None
        return M.ser_report(self.ser_out["true"], self.ser_out["pred"], speakers=speakers,
                            num_bootstraps=getattr(self.hparams, "num_bootstraps", 1000),
                            n_classes=len(EMOTIONS), seed=getattr(self.hparams, "seed", 0))

    def asr_wer(self):
        return M.wer(self.asr_out["refs"], self.asr_out["hyps"]) if self.asr_out["refs"] else None

    # -- stage ends ----------------------------------------------------------------------------------------
    def on_stage_start(self, stage, epoch=None):
        self.reset_outputs()
        self._stage_t0 = time.perf_counter()

    def log_and_checkpoint(self, stage, stage_loss, epoch, stats):
        """Validation: log and keep the checkpoint with the lowest validation loss."""
        stats = {"loss": stage_loss, **stats}
        if getattr(self, "_stage_t0", None) is not None:  # wall seconds of the stage, in train_log.txt
            stats["time_s"] = round(time.perf_counter() - self._stage_t0, 3)
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            return
        if stage == sb.Stage.VALID:
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch}, train_stats=getattr(self, "train_stats", None), valid_stats=stats)
            self.checkpointer.save_and_keep_only(meta={"loss": stage_loss}, min_keys=["loss"],
                                                 num_to_keep=getattr(self.hparams, "ckpts_to_keep", 1))

    def write_test_metrics(self, stage_loss, extra=None):
        """Test stage: metrics with 95% CIs (and WER) to ``<output_folder>/metrics.json`` (rank 0 only)."""
        out = {"experiment": Path(self.hparams.output_folder).name, "test_loss": float(stage_loss)}
        for key in ("table_rows", "part", "row", "order"):
            if getattr(self.hparams, key, None) is not None:
                out[key] = getattr(self.hparams, key)
        if self.ser_out["true"]:
            out["test"] = {**self.ser_stats(with_ci=True), "n": len(self.ser_out["true"]),
                           "classes": EMOTIONS}
        w = self.asr_wer()
        if w is not None:
            out["wer"] = w
            out["asr_examples"] = [{"id": i, "ref": r, "hyp": h} for i, r, h in
                                   list(zip(*self.asr_out.values()))[:5]]
        out.update(extra or {})
        self.hparams.train_logger.log_stats(
            stats_meta={"Epoch loaded": self.hparams.epoch_counter.current},
            test_stats={"loss": stage_loss, **({"UAR": out["test"]["uar"]} if "test" in out else {}),
                        **({"WER": w} if w is not None else {})})
        if sb.utils.distributed.if_main_process():
            M.write_metrics(Path(self.hparams.output_folder) / "metrics.json", out)
            if self.ser_out["true"]:
                self.write_predictions()
        return out

    def write_predictions(self):
        """Per-utterance predictions (id, true, predicted, class probabilities) as CSV, for error analysis."""
        from lobes.io_utils import atomic_write

        with atomic_write(Path(self.hparams.output_folder) / "predictions.csv") as f:
            f.write("id,true,pred," + ",".join(EMOTIONS) + "\n")
            for i, t, p, prob in zip(self.ser_out["ids"], self.ser_out["true"], self.ser_out["pred"],
                                     self.ser_out["prob"]):
                f.write(f"{i},{EMOTIONS[t]},{EMOTIONS[p]}," + ",".join(f"{x:.6f}" for x in prob) + "\n")


class CTCASRBrain(ToolkitBrain):
    """WavLM + linear CTC head; greedy decoding and WER on valid/test. Subclassed by each ASR recipe."""

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        hidden, mask = self.encode(batch)
        return self.ctc_log_probs(hidden), mask

    def compute_objectives(self, predictions, batch, stage):
        log_probs, mask = predictions
        if stage != sb.Stage.TRAIN:
            self.collect_asr(batch, self.ctc_hyps(log_probs, mask))
        return self.ctc_loss(log_probs, mask, batch)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TEST:
            self.write_test_metrics(stage_loss)
        else:
            stats = {} if stage == sb.Stage.TRAIN else {"WER": round(100 * self.asr_wer(), 2)}
            self.log_and_checkpoint(stage, stage_loss, epoch, stats)


def export_finetuned_backbone(encoder, out_dir):
    """Save a fine-tuned ``WavLMEncoder``'s WavLM as an HF directory (the W_ft of a task vector)."""
    import shutil

    out_dir = Path(out_dir)
    if not sb.utils.distributed.if_main_process():
        return out_dir
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = encoder.module.model if hasattr(encoder, "module") else encoder.model
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def fit_and_evaluate(brain, datasets, hparams):
    """The common tail of every train.py: fit with validation, then test on the best (lowest-loss) checkpoint."""
    from lobes.dataio import loader_kwargs

    brain.fit(hparams["epoch_counter"], datasets["train"], datasets["valid"],
              train_loader_kwargs=loader_kwargs(hparams, datasets["train"], train=True),
              valid_loader_kwargs=loader_kwargs(hparams, datasets["valid"], train=False))
    return brain.evaluate(datasets["test"], min_key="loss",
                          test_loader_kwargs=loader_kwargs(hparams, datasets["test"], train=False))
