#!/usr/bin/env python3
"""CTC fine-tuning of WavLM on MSP-Podcast transcripts: the in-domain ASR model (W_ASR_in) of AdaLTM.

    python train.py hparams/train_asr_ctc.yaml --data_folder /path/to/MSP-Podcast [--key=value ...]
"""
import sys
from pathlib import Path

import speechbrain as sb
from hyperpyyaml import load_hyperpyyaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from msp_podcast_prepare import prepare_msp_podcast  # noqa: E402

from lobes.brains import CTCASRBrain, export_finetuned_backbone, fit_and_evaluate  # noqa: E402
from lobes.dataio import asr_datasets, msp_manifests  # noqa: E402


class ASRBrain(CTCASRBrain):
    """In-domain CTC ASR on MSP-Podcast; forward/objectives are the toolkit's shared CTC steps."""


if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    sb.utils.distributed.ddp_init_group(run_opts)
    with open(hparams_file) as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    sb.create_experiment_directory(hparams["output_folder"], hyperparams_to_save=hparams_file,
                                   overrides=overrides)
    if not hparams["skip_prep"]:
        sb.utils.distributed.run_on_main(prepare_msp_podcast, kwargs={
            "data_folder": hparams["data_folder"], "save_folder": hparams["prep_folder"],
            "transcript_only": hparams["transcript_only"], "test_set": hparams["test_set"]})
    datasets = asr_datasets(msp_manifests(hparams))

    brain = ASRBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                     run_opts=run_opts, checkpointer=hparams["checkpointer"])
    fit_and_evaluate(brain, datasets, hparams)
    export_finetuned_backbone(brain.modules.wavlm, hparams["export_folder"])
