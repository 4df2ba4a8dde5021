#!/usr/bin/env python3
"""CTC fine-tuning of WavLM on LibriSpeech train-clean-100: the out-of-domain ASR model (W_ASR_out).

    python train.py hparams/train_asr_ctc.yaml --data_folder /path/to/LibriSpeech [--key=value ...]

The paper instead used the public patrickvonplaten/wavlm-libri-clean-100h-large; run.sh can import that one.
"""
import sys
from pathlib import Path

import speechbrain as sb
from hyperpyyaml import load_hyperpyyaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from librispeech_prepare import prepare_librispeech  # noqa: E402

from lobes.brains import CTCASRBrain, export_finetuned_backbone, fit_and_evaluate  # noqa: E402
from lobes.dataio import asr_datasets  # noqa: E402


class ASRBrain(CTCASRBrain):
    """Out-of-domain CTC ASR on LibriSpeech; shares the toolkit's CTC steps."""


if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    sb.utils.distributed.ddp_init_group(run_opts)
    with open(hparams_file) as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    sb.create_experiment_directory(hparams["output_folder"], hyperparams_to_save=hparams_file,
                                   overrides=overrides)
    splits = {"train": hparams["train_split"], "valid": hparams["valid_split"], "test": hparams["test_split"]}
    if not hparams["skip_prep"]:
        sb.utils.distributed.run_on_main(prepare_librispeech, kwargs={
            "data_folder": hparams["data_folder"], "save_folder": hparams["prep_folder"],
            "splits": tuple(splits.values()), "required_splits": tuple(splits.values())})
    datasets = asr_datasets({k: str(Path(hparams["prep_folder"]) / f"{v}.json") for k, v in splits.items()})

    brain = ASRBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                     run_opts=run_opts, checkpointer=hparams["checkpointer"])
    fit_and_evaluate(brain, datasets, hparams)
    export_finetuned_backbone(brain.modules.wavlm, hparams["export_folder"])
