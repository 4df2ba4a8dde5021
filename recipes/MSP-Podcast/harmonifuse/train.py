#!/usr/bin/env python3
"""HarmoniFuse: one speech LM for ASR (LibriSpeech) and 8-class SER (MSP-Podcast), batch-interleaved.

    python train.py hparams/harmonifuse.yaml --msp_folder /data/MSP-Podcast --libri_folder /data/LibriSpeech \
        --wavlm_source microsoft/wavlm-large --lm_source /models/my-causal-lm
    python train.py hparams/rows/static_encoder_fusion.yaml ...            # an ablation row
    torchrun --nproc_per_node=4 train.py hparams/harmonifuse.yaml ...       # DDP: each rank its own shards

Training alternates whole batches of one task (ratio ``interleave_ratio``), the task prompt set per batch; no
utterance needs both labels. Every batch carries its ``TaskSplit`` (task + split). Validation runs both tasks;
the kept checkpoint has the lowest combined validation loss (mean ASR batch loss + mean SER batch loss). The
test writes metrics.json, fusion_weights.json, the layer-weight and confusion plots and per-utterance
predictions (``lobes.harmonifuse.reporting``; a generated SER output that is no class name is "invalid").
Data, loaders and DDP dealing: ``lobes.harmonifuse.data``; per-source training losses stay on the device until
the stage ends; outputs, batch losses and fusion statistics are gathered in single-process order before scoring.
"""
import sys
from pathlib import Path

import speechbrain as sb
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "LibriSpeech"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "IEMOCAP"))
from iemocap_prepare import prepare_iemocap  # noqa: E402
from librispeech_prepare import prepare_librispeech  # noqa: E402
from msp_podcast_prepare import prepare_msp_podcast  # noqa: E402

from lobes import distributed as D  # noqa: E402
from lobes import metrics as M  # noqa: E402
from lobes import plots  # noqa: E402
from lobes.brains import ToolkitBrain  # noqa: E402
from lobes.ctc_text import normalize_transcript  # noqa: E402
from lobes.harmonifuse import artefacts as A  # noqa: E402
from lobes.harmonifuse import reporting as R  # noqa: E402
from lobes.harmonifuse.data import build_datasets, check_hparams, make_loaders, needs_unused_parameter_search  # noqa: E402,E501
from lobes.harmonifuse.interleave import batch_task, is_padding  # noqa: E402
from lobes.harmonifuse.task_losses import TaskLosses, share_count, weighted_share_loss  # noqa: E402
from lobes.harmonifuse.task_split import TaskSplit  # noqa: E402
from lobes.hparams_io import load_hparams  # noqa: E402
from lobes.memory_plan import resolve_task_batches  # noqa: E402


class HarmoniFuseBrain(ToolkitBrain):
    """Batches carry a ``TaskSplit``: ``asr`` / ``ser`` / ``ser:<source>`` (training), ``asr:<split>`` /
    ``ser:<split>`` (evaluation)."""

    @property
    def speech_lm(self):
        m = self.modules.speech_lm
        return m.module if hasattr(m, "module") else m  # DDP wrapper -> model (generate, fusion_weights)

    def decoding(self, stage):
        if stage != sb.Stage.VALID:
            return stage == sb.Stage.TEST
        epoch = self.hparams.epoch_counter.current
        return epoch % self.hparams.valid_search_interval == 0 or epoch >= self.hparams.number_of_epochs

    def compute_forward(self, batch, stage):
        tag = TaskSplit.parse(batch_task(batch))
        # target texts from the host batch, before it moves to the device (no device read)
        classes = self.hparams.emotion_classes
        targets = list(batch.wrd) if tag.task == "asr" else [classes[i] for i in batch.emo_idx.data.view(-1).tolist()]
        # an extra SER source (ser:<name>, e.g. pseudo-labelled) trains on its soft labels (lobes.harmonifuse.targets)
        soft = batch.soft_label.data if stage == sb.Stage.TRAIN and tag.task == "ser" and tag.split else None
        # DDP training: this rank's share of the global batch counts this many loss units (0: a padding share)
        share = (0 if is_padding(batch) else share_count(self.speech_lm, tag.task, targets, soft)) \
            if stage == sb.Stage.TRAIN and D.is_distributed() else None
        batch = batch.to(self.device)
        wavs, lens = batch.sig
        # evaluation bypasses the DDP wrapper: its forward may broadcast buffers (a collective), and the ranks'
        # evaluation shards can differ in batch count (or be empty)
        model = self.modules.speech_lm if stage == sb.Stage.TRAIN else self.speech_lm
        out = model(wavs, lens, tag.task, targets, soft_targets=soft)
        hyps = None
        if self.decoding(stage):
            max_len = self.hparams.asr_max_decode_len if tag.task == "asr" else self.hparams.ser_max_decode_len
            hyps = self.speech_lm.generate(wavs, lens, tag.task, max_len=max_len, num_beams=self.hparams.num_beams,
                                           length_penalty=self.hparams.length_penalty)
        return tag, out, hyps, share

    def compute_objectives(self, predictions, batch, stage):
        tag, out, hyps, share = predictions
        self.rank_batches += 1
        if stage == sb.Stage.TRAIN:
            # DDP: weighted so that the ranks' gradient average is the whole global batch's (task_losses.py);
            # per-source running sum kept on the device (read once at the stage end); a non-finite loss stops
            # training in check_loss_isfinite, right after this, before it is ever read
            loss = weighted_share_loss(out.loss, share)
            self.losses.add_train(tag, loss)
            return loss
        self.losses.add_eval(list(batch.id), tag, out.loss)  # every utterance, with its batch's loss
        if hyps is None:
            return out.loss
        outputs = self.outputs.setdefault(tag, R.split_collector(tag, self.hparams.emotion_classes))
        if tag.task == "asr":
            outputs.add(ids=list(batch.id), refs=[normalize_transcript(r) for r in batch.wrd],
                        hyps=[normalize_transcript(h) for h in hyps])
        else:
            outputs.add_generated(list(batch.id), batch.emo_idx.data, hyps, list(batch.spk_id))
        return out.loss

    # -- stages --------------------------------------------------------------------------------------------
    def on_stage_start(self, stage, epoch=None):
        super().on_stage_start(stage, epoch)
        self.rank_batches = 0                                      # batches this rank ran in the stage
        self.losses = TaskLosses()                                 # per-TaskSplit batch losses
        self.outputs = {}                                          # TaskSplit -> its split's collector
        if stage == sb.Stage.TEST:
            self.speech_lm.reset_fusion_stats()  # the plotted dynamic weights are those of the test inputs

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage != sb.Stage.TRAIN:
            self.gather(self.losses)  # DDP: every rank's rows in single-process order, then each split's outputs
            self.outputs = R.gather_by_split(self.losses, self.outputs, self.hparams.emotion_classes)
        if stage == sb.Stage.TEST:
            return self.write_test_outputs()
        if stage == sb.Stage.TRAIN and D.is_distributed():  # the ranks' weighted share losses -> one process's
            self.losses.reduce_train()
            stage_loss = D.sum_over_ranks(torch.tensor(float(stage_loss))).item() / D.world_size()
        stats = self.losses.log_stats()  # training: one key per source; evaluation: per task
        stats["batches"] = D.all_gather(self.rank_batches)  # DDP: training the same count, evaluation r, r+W, ...
        if stage == sb.Stage.TRAIN:
            return self.log_and_checkpoint(stage, stage_loss, epoch, stats)
        for outputs in self.outputs.values():
            stats.update(outputs.summary())
        stats.update(R.top_layers(self.speech_lm, self.hparams.train_tasks))
        self.log_and_checkpoint(stage, self.losses.combined(), epoch, stats, gathered=True)

    def write_test_outputs(self):
        h, slm = self.hparams, self.speech_lm
        R.gather_fusion_stats(slm)
        out = {"experiment": h.experiment, "test_loss": self.losses.combined(), "train_tasks": list(h.train_tasks),
               "encoder_fusion": R.fusion_description(slm), "lm_fusion": slm.lm_fusion.mode, "lm_mode": slm.lm_mode,
               "prompt_mode": slm.prompt_mode, "test_loss_by_split": {str(t): v for t, v in self.losses.means().items()}}
        out.update({"table_rows": h.table_rows} if h.table_rows else {})
        asr = {tag.split: c for tag, c in self.outputs.items() if tag.task == "asr" and len(c)}
        out.update(R.asr_test_metrics(asr, h.num_bootstraps, h.seed) if asr else {})
        ser = next((c for tag, c in self.outputs.items() if tag.task == "ser"), None)
        out.update(ser.report(h.num_bootstraps, h.seed, h.speaker_bootstrap) if ser is not None else {})
        stats = {k: round(100 * out[k], 2) for k in ("wer", "ua", "wa") if k in out}
        stats["batches"] = D.all_gather(self.rank_batches)  # per rank (train_log.txt only: metrics.json is W-free)
        h.train_logger.log_stats(stats_meta={"Epoch loaded": h.epoch_counter.current},
                                 test_stats={"loss": out["test_loss"], **stats})
        if sb.utils.distributed.if_main_process():
            folder = Path(h.output_folder)
            M.write_metrics(folder / "metrics.json", out)
            R.write_predictions(folder, asr, ser)
            R.write_fusion_artifacts(slm, list(h.train_tasks), folder)
            A.write_artefacts(slm, folder, A.decoding_settings(h))  # the tested model, in peft / safetensors files
            if "test" in out:
                plots.plot_confusion(out["test"]["confusion"], list(h.emotion_classes) + [R.INVALID],
                                     folder / "confusion.png", title=f"SER confusion — {h.experiment}")
        return out


def prepare(hparams):
    """Manifests of the trained tasks' corpora (on the main process): the SER corpus, LibriSpeech."""
    tasks = hparams["train_tasks"]
    if "ser" in tasks and hparams["ser_corpus"] == "iemocap":
        sb.utils.distributed.run_on_main(prepare_iemocap, kwargs={
            "data_folder": hparams["iemocap_folder"], "save_folder": hparams["iemocap_prep_folder"],
            "folds": (int(hparams["iemocap_fold"]),), "asr_manifests": False})
    elif "ser" in tasks:
        sb.utils.distributed.run_on_main(prepare_msp_podcast, kwargs={
            "data_folder": hparams["msp_folder"], "save_folder": hparams["msp_prep_folder"],
            "transcript_only": hparams["transcript_only"], "test_splits": hparams["test_splits"],
            "classes": hparams["emotion_classes"]})
    if "asr" in tasks:
        train, valid = list(hparams["libri_train_splits"]), hparams["libri_valid_split"]
        tests = list(hparams["libri_test_splits"])
        sb.utils.distributed.run_on_main(prepare_librispeech, kwargs={
            "data_folder": hparams["libri_folder"], "save_folder": hparams["libri_prep_folder"],
            "splits": tuple(dict.fromkeys(train + [valid] + tests)), "required_splits": tuple(train + [valid, tests[0]])})


if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    sb.utils.distributed.ddp_init_group(run_opts)
    hparams, base_file, overrides = load_hparams(hparams_file, overrides)
    sb.create_experiment_directory(hparams["output_folder"], hyperparams_to_save=base_file, overrides=overrides)
    check_hparams(hparams)
    if not hparams["skip_prep"]:
        prepare(hparams)
    datasets = build_datasets(hparams)
    resolve_task_batches(hparams, run_opts, HarmoniFuseBrain, datasets["train"])  # micro_batch_size: auto
    train_loader, (valid_set, valid_kwargs), (test_set, test_kwargs) = make_loaders(hparams, datasets)
    brain = HarmoniFuseBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                             run_opts=run_opts, checkpointer=hparams["checkpointer"])
    # Every trainable parameter gets a gradient from every batch (SpeechLM freezes what cannot), except the SER
    # classification head on ASR batches: only then must DDP search for unused parameters.
    brain.find_unused_parameters = brain.find_unused_parameters or needs_unused_parameter_search(hparams)
    brain.train_sampler = train_loader.batch_sampler  # fit() calls its set_epoch(epoch) every epoch
    brain.fit(hparams["epoch_counter"], train_loader, valid_set, valid_loader_kwargs=valid_kwargs)
    brain.evaluate(test_set, min_key="loss", test_loader_kwargs=test_kwargs)
