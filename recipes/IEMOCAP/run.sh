#!/usr/bin/env bash
# IEMOCAP recipe (ESPnet-style stages): 4-class SER, in-domain ASR-CTC and AdaLTM rows on the folds of
# --split_protocol (default: the 5 leave-one-session-out folds), then UA / WA averaged over the folds with 95% CIs.
#
#   stage 0: data preparation (classes.txt, folds.tsv + fold{k} manifests; see iemocap_prepare.py)
#            with --mini true: first generate the mini IEMOCAP and the tiny WavLM (offline demo)
#   stage 1: per fold: in-domain ASR-CTC fine-tuning on the fold's training transcripts (W_ASR_in of that fold)
#   stage 2: per fold: SER fine-tuning (W_SER of that fold; also the "SER fine-tuning" baseline row)
#   stage 3: per fold: task vectors ΔW = W_ft − W_base, then the selected AdaLTM rows (hparams/rows)
#   stage 4: fold averages (average_folds.py): per fold the mean over --seeds, then UA / WA / MaF1 mean ±
#            Student-t 95% interval over the folds (the fold is the repeated unit), one table results/folds.md
#
# Examples
#   bash recipes/IEMOCAP/run.sh --mini true                          # whole pipeline on generated data (CPU)
#   bash recipes/IEMOCAP/run.sh --data_folder /corpora/IEMOCAP_full_release --ngpu 4
#   bash recipes/IEMOCAP/run.sh --stage 3 --folds "1 2" --rows "setup4_dual" -- --number_of_epochs=5
#                                                                    # args after -- go to every train.py
set -euo pipefail

recipe_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "${recipe_dir}/../.." && pwd)

# ----------------------------------------------------------------- options
stage=0                     # first stage to run (0-4)
stop_stage=4                # last stage to run (0-4)
ngpu=1                      # GPUs per node; >1 or nnodes >1: torchrun --nproc_per_node=<ngpu> (SpeechBrain DDP)
device=                     # cuda:0 / cpu; empty = SpeechBrain's default
nnodes=1                    # machines; >1: run this script on each one (README: several machines, shared filesystem)
node_rank=0                 # this machine's index, 0..nnodes-1; node 0 alone runs the steps that write shared files
master_addr=                # node 0's host name or address, the same on every node (needed with --nnodes > 1)
master_port=29500           # rendezvous port on node 0 (consecutive torchrun jobs alternate with the next port)
node_timeout=3600           # seconds the other nodes wait for node 0's shared steps (data preparation, task vectors)
nj=                         # jobs of a stage at once (folds; rows x seeds x folds), logs in <exp>/logs; empty: the CPU count with --mini true (one thread each), else 1
mini=false                  # true: generate the mini IEMOCAP + tiny WavLM and use fast demo settings
data_folder=                # IEMOCAP_full_release (Session1 ... Session5)
split_protocol=sessions     # sessions (leave one session out) | speakers (leave one speaker out) | random (80/10/10)
folds=all                   # folds to run, e.g. "1 3"; all = every fold of split_protocol (5, 10 or 1)
wavlm_source=microsoft/wavlm-large    # W_base: hub id or local directory
exp=exp/iemocap_recipe      # everything this recipe writes
asr_out_source=             # out-of-domain ASR model for the out_of_domain_dual row (e.g. a LibriSpeech CTC model)
asr_out_kind=auto           # hf | hf_ctc | speechbrain | auto
rows="setup1_frozen setup2_asr_only setup3_ser_only setup4_dual"   # AdaLTM rows (hparams/rows/<row>.yaml)
tuning_folds=auto           # folds whose test data informed a setting: left out of results/folds.md (auto: 1 with --mini true and sessions, else none)
seeds=1986                  # stage 3: each row once per seed, into rows/<row>/<seed>/fold<k>; stages 1-2: the first
asr_args=""                 # extra overrides for the stage-1 ASR-CTC runs
ser_args=""                 # extra overrides for the stage-2 SER runs
adaltm_args=""              # extra overrides for the AdaLTM rows

. "${root}/tools/recipe_lib.sh"   # parses the options above (--help lists them); defines log, launch, ${py}
extra=("$@")                # passed to every train.py

if [ "${mini}" = true ]; then
    data_folder=${data_folder:-${exp}/data/IEMOCAP_full_release}
    [ "${wavlm_source}" = microsoft/wavlm-large ] && wavlm_source=${root}/tools/fixtures/tiny_wavlm_pretrained
    # tiny pretrained base (as in ../MSP-Podcast/adaltm/run.sh), ~35 labelled / ~41 transcribed training utterances
    # per fold (README "Results"): constant rates (a warm-up + decay schedule moves too slowly in so few steps;
    # JSON-style keys, no spaces); CTC with small batches and time masking; its lowest-validation-loss checkpoint
    # came at epoch 16-24 in every fold-1 trial, so 30 epochs; SER and AdaLTM rows: 30 epochs of batches of 8
    constant='--lr_schedulers={"opt_class":null,"backbone_opt_class":null}'
    # (launch keeps the last of a repeated --key=value: --asr_args / --ser_args / --adaltm_args and -- override these)
    # the independent runs of a stage side by side, one core and at most ~2 GiB each (the same numbers)
    nj=${nj:-$(cpu_jobs)}
    asr_args="--number_of_epochs=30 --batch_size=4 --lr=0.02 --lr_wavlm=0.01 --mask_time_prob=0.2 ${constant} ${asr_args}"
    ser_args="--number_of_epochs=30 --lr=0.003 --lr_wavlm=0.001 --head_hidden=64 --num_bootstraps=200 ${constant} ${ser_args}"
    adaltm_args="--number_of_epochs=30 --lr=0.01 --batch_size=8 --head_hidden=64 --num_bootstraps=200 ${adaltm_args}"
    # these settings were tried on fold 1 with its test session scored (README, "How the mini settings were
    # chosen"): fold 1 is no held-out result, so results/folds.md averages folds 2-5
    [ "${tuning_folds}" = auto ] && [ "${split_protocol}" = sessions ] && tuning_folds=1
fi
[ "${tuning_folds}" = auto ] && tuning_folds=""
[ -n "${data_folder}" ] || { echo "--data_folder (IEMOCAP_full_release) is required (or --mini true)" >&2; exit 1; }
case "${split_protocol}" in
    sessions) all_folds="1 2 3 4 5" ;;
    speakers) all_folds="1 2 3 4 5 6 7 8 9 10" ;;
    random) all_folds="1" ;;
    *) echo "--split_protocol must be sessions, speakers or random" >&2; exit 1 ;;
esac
[ "${folds}" = all ] && folds=${all_folds}
for row in ${rows}; do
    [ -f "${recipe_dir}/adaltm/hparams/rows/${row}.yaml" ] || { echo "no row file adaltm/hparams/rows/${row}.yaml" >&2; exit 1; }
    if [ "${row}" = out_of_domain_dual ] && [ -z "${asr_out_source}" ]; then
        echo "row out_of_domain_dual needs --asr_out_source (an out-of-domain ASR model)" >&2; exit 1
    fi
done

read -r -a seed_list <<< "${seeds}"
[ ${#seed_list[@]} -gt 0 ] || { echo "--seeds: give at least one seed" >&2; exit 1; }
for s in "${seed_list[@]}"; do
    [[ ${s} =~ ^[0-9]+$ ]] || { echo "--seeds: '${s}' is not a non-negative integer" >&2; exit 1; }
    [ "$(tr ' ' '\n' <<< "${seeds}" | grep -cx "${s}")" -eq 1 ] || { echo "--seeds: ${s} is given twice" >&2; exit 1; }
done
seed=${seed_list[0]}        # the source models (stages 1-2: ASR-CTC, SER) and their task vectors: one seed

prep=${exp}/prep
vectors=${exp}/task_vectors
common=(--seed="${seed}" --wavlm_source="${wavlm_source}" --data_folder="${data_folder}" --prep_folder="${prep}"
        --split_protocol="${split_protocol}"
        ${device:+--device="${device}"})

pool_start "${exp}/logs"

if [ ${stage} -le 0 ] && [ ${stop_stage} -ge 0 ]; then
    log "Stage 0: data preparation"
    if node0_begin "stage 0 (data preparation)"; then   # writes shared files: node 0 only, the others wait
        if [ "${mini}" = true ]; then
            log "generating the mini IEMOCAP under ${exp}/data; base: ${wavlm_source}"
            [ -d "${data_folder}/Session1" ] || "${py}" "${recipe_dir}/make_mini_iemocap.py" --out "${data_folder}"
        fi
        # with the recipes' default class_map / valid_gender; each train.py prepares again only when its own
        # settings differ (a custom map given after --, e.g. -- --class_map=... --emotion_classes=...)
        "${py}" "${recipe_dir}/iemocap_prepare.py" --data_folder "${data_folder}" --save_folder "${prep}" \
            --split_protocol "${split_protocol}"
    fi
    node0_end
fi

if [ ${stage} -le 1 ] && [ ${stop_stage} -ge 1 ]; then
    for fold in ${folds}; do
        log "Stage 1: fold ${fold}: in-domain ASR-CTC fine-tuning on IEMOCAP transcripts"
        # shellcheck disable=SC2086
        pool_run "asr_ctc_fold${fold}" launch "${recipe_dir}/asr_ctc/train.py" "${recipe_dir}/asr_ctc/hparams/train_asr_ctc.yaml" "${common[@]}" \
            --fold="${fold}" --output_folder="${exp}/asr_ctc/fold${fold}" ${asr_args} "${extra[@]}"
    done
fi

if [ ${stage} -le 2 ] && [ ${stop_stage} -ge 2 ]; then
    for fold in ${folds}; do
        log "Stage 2: fold ${fold}: SER fine-tuning"
        # shellcheck disable=SC2086
        pool_run "ser_fold${fold}" launch "${recipe_dir}/ser/train.py" "${recipe_dir}/ser/hparams/train_ser.yaml" "${common[@]}" \
            --fold="${fold}" --output_folder="${exp}/ser/fold${fold}" ${ser_args} "${extra[@]}"
    done
fi
pool_wait   # the source models are trained before their task vectors are taken

if [ ${stage} -le 3 ] && [ ${stop_stage} -ge 3 ]; then
    for fold in ${folds}; do
        log "Stage 3a: fold ${fold}: task vectors ΔW = W_ft − W_base"
        if node0_begin "stage 3a of fold ${fold} (task vectors)"; then
            if [ -n "${asr_out_source}" ] && [ ! -f "${vectors}/asr_out.safetensors" ]; then
                log "  out-of-domain ASR vector from ${asr_out_source} (one for every fold)"
                "${py}" -m tools.extract_task_vector --base "${wavlm_source}" --finetuned "${asr_out_source}" \
                    --kind "${asr_out_kind}" --name ASR --out "${vectors}/asr_out.safetensors"
            fi
            mkdir -p "${vectors}/fold${fold}"
            for spec in "ASR ${exp}/asr_ctc/fold${fold}/finetuned_wavlm asr_in" "SER ${exp}/ser/fold${fold}/finetuned_wavlm ser"; do
                read -r name src out <<< "${spec}"
                if [ -f "${vectors}/fold${fold}/${out}.safetensors" ]; then
                    log "  ${out}: ${vectors}/fold${fold}/${out}.safetensors exists, kept"; continue
                fi
                "${py}" -m tools.extract_task_vector --base "${wavlm_source}" --finetuned "${src}" --kind hf \
                    --name "${name}" --out "${vectors}/fold${fold}/${out}.safetensors"
            done
            if [ -f "${vectors}/asr_out.safetensors" ]; then
                ln -sf ../asr_out.safetensors "${vectors}/fold${fold}/asr_out.safetensors"
            fi
        fi
        node0_end
        for s in "${seed_list[@]}"; do
            seeded=("${common[@]/#--seed=*/--seed=${s}}")
            for row in ${rows}; do
                log "Stage 3b: fold ${fold}: AdaLTM row ${row}, seed ${s}"
                # shellcheck disable=SC2086
                pool_run "${row}_${s}_fold${fold}" launch "${recipe_dir}/adaltm/train.py" "${recipe_dir}/adaltm/hparams/rows/${row}.yaml" "${seeded[@]}" \
                    --fold="${fold}" --exp_folder="${exp}/rows" \
                    --vectors_folder="${vectors}/fold${fold}" ${adaltm_args} "${extra[@]}"
            done
        done
    done
    pool_wait
fi

if [ ${stage} -le 4 ] && [ ${stop_stage} -ge 4 ] && ! is_node0; then
    log "Stage 4: fold averages, on node 0"
elif [ ${stage} -le 4 ] && [ ${stop_stage} -ge 4 ]; then
    log "Stage 4: fold averages (UA, WA, MaF1: per fold the mean over seeds; mean ± Student-t 95% interval over folds)"
    inputs=(); held_out=()
    [ -d "${exp}/ser" ] && inputs+=("${exp}/ser"/fold*)   # SER source models: the first seed only
    for s in "${seed_list[@]}"; do   # every seed's runs in one table: average_folds averages the seeds of a fold
        for d in "${exp}"/rows/*/; do [ -d "${d}${s}" ] && inputs+=("${d%/}/${s}"/fold*); done
    done
    [ ${#inputs[@]} -gt 0 ] || { echo "no results of the seeds ${seeds} under ${exp}/ser or ${exp}/rows: run stages 2-3 first" >&2; exit 1; }
    for f in "${inputs[@]}"; do [[ " ${tuning_folds} " == *" ${f##*/fold} "* ]] || held_out+=("${f}"); done
    out=${exp}/results/folds
    if [ -n "${tuning_folds}" ]; then   # every fold, the tuning one(s) included: a record, not the result
        "${py}" "${recipe_dir}/average_folds.py" "${inputs[@]}" --out "${out}_with_tuning_folds" \
            --n_folds "$(wc -w <<< "${all_folds}")" >/dev/null
        log "  fold(s) ${tuning_folds} left out of ${out}.md (settings were chosen on them); all folds: ${out}_with_tuning_folds.md"
    fi
    "${py}" "${recipe_dir}/average_folds.py" "${held_out[@]}" --out "${out}" --n_folds "$(wc -w <<< "${all_folds}")"
    if [ -d "${exp}/asr_ctc" ]; then
        "${py}" "${recipe_dir}/average_folds.py" "${exp}/asr_ctc" --out "${exp}/results/asr_folds" \
            --n_folds "$(wc -w <<< "${all_folds}")" >/dev/null
        log "in-domain ASR WER per fold and mean: ${exp}/results/asr_folds.md"
    fi
    log "results: ${exp}/results/folds.md (and .csv, .json)"
fi
