#!/usr/bin/env bash
# AdaLTM recipe (ESPnet-style stages). Every Table-1 row of the paper, from data to results table.
#
#   stage 0: data preparation (MSP-Podcast; LibriSpeech for the out-of-domain ASR model)
#            with --mini true: first generate the mini corpora; base: the pretrained tiny WavLM fixture (offline demo)
#   stage 1: ASR-CTC fine-tuning: in-domain (MSP-Podcast transcripts) and out-of-domain (LibriSpeech)
#            skipped for a model given with --asr_in_source / --asr_out_source
#   stage 2: SER fine-tuning on MSP-Podcast (skipped for a model given with --ser_source)
#   stage 3: task-vector extraction, then training of the selected Table-1 rows (AdaLTM + MTL)
#   stage 4: evaluation summary: the source models' reference rows (SER source MaF1; WER of the in- and out-of-domain
#            ASR sources on the MSP-Podcast test split, tools.eval_asr), the results table (markdown + CSV, 95% CIs),
#            the same table marked by paired tests against Setups 1 and 4 (table_significance; --wer_mark true:
#            WER against the in-domain ASR source too, from the rows' asr_predictions.csv), with several seeds
#            the table over seeds (table_seeds: mean ± t interval, pooled CI), the paper's Figure 2 (dual vs single
#            vector λ) and Figure 3 (in- vs out-of-domain λ; several seeds: mean and band), per-run λ / α plots
#
# Examples
#   bash run.sh --mini true                                   # whole pipeline on generated data (CPU, minutes)
#   bash run.sh --data_folder /data/MSP-Podcast --libri_folder /data/LibriSpeech --ngpu 4
#   bash run.sh --stage 3 --asr_in_source exp/my_asr/finetuned_wavlm --ser_source tiantiaf/wavlm-large-categorical-emotion \
#       --asr_out_source patrickvonplaten/wavlm-libri-clean-100h-large --data_folder /data/MSP-Podcast
#   bash run.sh --stage 3 --stop_stage 3 --rows "setup4_dual" -- --number_of_epochs=5   # args after -- go to train.py
#   bash run.sh --data_folder /data/MSP-Podcast --libri_folder /data/LibriSpeech --test_splits "Test1 Test2"
#   bash run.sh --stage 4 --ser_metrics exp/my_ser/metrics.json     # table, reference rows and figures only
#   bash run.sh --mini true --stage 3 --stop_stage 3 --seeds "1987 1988"   # more seeds of a finished run's rows,
#   bash run.sh --mini true --stage 4 --seeds "1986 1987 1988"             # then every seed's table (README, "Seeds")
set -euo pipefail

recipe_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "${recipe_dir}/../../.." && pwd)
msp_dir=$(cd "${recipe_dir}/.." && pwd)

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
nj=                         # jobs of a stage at once (source models; rows x seeds), logs in <exp>/logs; empty: the CPU count with --mini true (one thread each), else 1
mini=false                  # true: generate mini corpora + tiny WavLM and use fast demo settings
mini_msp_test_factor=3      # --mini true: Test1 utterances of the mini MSP-Podcast, times the generator's default
mini_libri_utts=180         # --mini true: train-clean-100 utterances of the generated mini LibriSpeech
mini_libri_eval_utts=48     # --mini true: its dev-clean and test-clean utterances, each
data_folder=                # MSP-Podcast root (Audios/ Labels/ Transcripts/)
libri_folder=               # LibriSpeech root (train-clean-100/ dev-clean/ test-clean/)
wavlm_source=microsoft/wavlm-large    # W_base: hub id or local directory
exp=exp/adaltm_recipe       # everything this recipe writes
asr_in_source=              # existing in-domain ASR model (skips its fine-tuning)
asr_in_kind=auto            # hf | hf_ctc | speechbrain | auto
asr_out_source=             # e.g. patrickvonplaten/wavlm-libri-clean-100h-large
asr_out_kind=auto           # hf | hf_ctc | speechbrain | voxprofile | auto (tools.extract_task_vector --kind)
ser_source=                 # e.g. tiantiaf/wavlm-large-categorical-emotion
ser_kind=auto               # hf | hf_ctc | speechbrain | voxprofile | auto (tools.extract_task_vector --kind)
ser_metrics=                # SER source's metrics.json on the test split (default: stage 2's ${exp}/ser/metrics.json)
test_splits="Test1"         # MSP-Podcast Split_Set value(s) forming the test split: "Test1", "Test2" or "Test1 Test2"
eval_batch_size=8           # stage 4: utterances per batch when the ASR sources are evaluated
rows="setup1_frozen setup2_asr_only setup3_ser_only setup4_dual out_of_domain_dual static_global adaptive_global"  # AdaLTM rows (hparams/rows)
mtl_rows="fully_trainable static_init"   # MTL rows (../mtl/hparams/rows; fully_trainable_dlr: the variant)
wer_mark=false              # stage 4: true = also mark WER (MTL rows, W_ASR_out) against W_ASR_in (§, paired test)
seeds=1986                  # stage 3: each row trains once per seed, into rows/<row>/<seed>/; stages 1-2: the first
asr_args=""                 # extra overrides for the stage-1 ASR-CTC fine-tuning runs
ser_args=""                 # extra overrides for the stage-2 SER fine-tuning
adaltm_args=""              # extra overrides for the AdaLTM rows
mtl_args=""                 # extra overrides for the MTL rows

. "${root}/tools/recipe_lib.sh"   # parses the options above; defines log, launch, ${py}
extra=("$@")                # passed to every train.py

if [ "${mini}" = true ]; then
    data_folder=${data_folder:-${exp}/data/MSP-Podcast}
    libri_folder=${libri_folder:-${exp}/data/LibriSpeech}
    [ "${wavlm_source}" = microsoft/wavlm-large ] && wavlm_source=${root}/tools/fixtures/tiny_wavlm_pretrained
    # tiny pretrained base, ~120 transcribed / 160 labelled MSP training utterances, 180 LibriSpeech ones (more
    # renderings per sentence lowered the out-of-domain test WER from 64% to 42% at 60 epochs; more epochs on 60 did
    # not; 48 test utterances instead of 16 narrow its CI from ±18 to ±10 points). Three times the MSP-Podcast
    # Test1 utterances (118 instead of 44) narrow every Table-1 CI by about √3 for a few seconds of evaluation. CTC needs many small steps and SpecAugment-style time masking to leave the all-blank output; constant
    # rates: the warm-up + decay schedule moves too slowly in so few steps (JSON-style keys, no spaces).
    # Every AdaLTM row trains the same number of epochs, as in the paper (best validation loss of each).
    # One intra-op thread per process: the tiny model gains nothing from more, two threads slowed an epoch from
    # 1.8 s to 30 s when other jobs shared the 2 cores, and a fixed count keeps the float reduction order, hence
    # the numbers, the same on machines with more cores.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    # the independent runs of a stage side by side, one core and at most ~2 GiB each (a run peaks at 1.5 GiB RSS):
    # the same numbers in less wall time
    nj=${nj:-$(cpu_jobs)}
    asr_args="--number_of_epochs=60 --batch_size=4 --lr=0.02 --lr_wavlm=0.01 --mask_time_prob=0.2 ${asr_args}"
    asr_args="--lr_schedulers={\"opt_class\":null,\"backbone_opt_class\":null} ${asr_args}"
    ser_args="--number_of_epochs=15 --lr=0.003 --lr_wavlm=0.001 --head_hidden=64 --num_bootstraps=200 ${ser_args}"
    adaltm_args="--number_of_epochs=15 --lr=0.01 --batch_size=16 --head_hidden=64 --num_bootstraps=200 ${adaltm_args}"
    mtl_args="--number_of_epochs=4 --lr=0.003 --lr_wavlm=0.001 --head_hidden=64 --num_bootstraps=200 ${mtl_args}"
fi
[ -n "${data_folder}" ] || { echo "--data_folder (MSP-Podcast root) is required (or --mini true)" >&2; exit 1; }

prep=${exp}/prep
vectors=${exp}/task_vectors
read -r -a test_split_list <<< "${test_splits}"
read -r -a seed_list <<< "${seeds}"
[ ${#seed_list[@]} -gt 0 ] || { echo "--seeds: give at least one seed" >&2; exit 1; }
for s in "${seed_list[@]}"; do
    [[ ${s} =~ ^[0-9]+$ ]] || { echo "--seeds: '${s}' is not a non-negative integer" >&2; exit 1; }
    [ "$(tr ' ' '\n' <<< "${seeds}" | grep -cx "${s}")" -eq 1 ] || { echo "--seeds: ${s} is given twice" >&2; exit 1; }
done
seed=${seed_list[0]}        # the source models (stages 1-2) and their task vectors: one seed
test_splits_yaml="[$(IFS=,; echo "${test_split_list[*]}")]"
common=(--seed="${seed}" --wavlm_source="${wavlm_source}" ${device:+--device="${device}"})
msp_opts=(--test_splits="${test_splits_yaml}")   # MSP-Podcast recipes only (recorded in their hyperparams.yaml)

pool_start "${exp}/logs"

if [ ${stage} -le 0 ] && [ ${stop_stage} -ge 0 ]; then
    log "Stage 0: data preparation"
    if node0_begin "stage 0 (data preparation)"; then   # writes shared files: node 0 only, the others wait
        if [ "${mini}" = true ]; then
            log "generating the mini corpora under ${exp}/data; base: ${wavlm_source}"
            "${py}" -m tools.make_mini_corpora --msp_out "${data_folder}" --libri_out "${libri_folder}" \
                --msp_test_factor "${mini_msp_test_factor}" --n_libri "${mini_libri_utts}" \
                --n_libri_eval "${mini_libri_eval_utts}"
        fi
        "${py}" "${msp_dir}/msp_podcast_prepare.py" --data_folder "${data_folder}" --save_folder "${prep}/msp" \
            --transcript_only --test_splits "${test_split_list[@]}"
        if [ -n "${libri_folder}" ] && [ -z "${asr_out_source}" ]; then
            "${py}" "${root}/recipes/LibriSpeech/librispeech_prepare.py" --data_folder "${libri_folder}" \
                --save_folder "${prep}/libri"
        fi
    fi
    node0_end
fi

if [ ${stage} -le 1 ] && [ ${stop_stage} -ge 1 ]; then
    if [ -z "${asr_in_source}" ]; then
        log "Stage 1a: in-domain ASR-CTC fine-tuning on MSP-Podcast transcripts"
        pool_run asr_ctc_msp launch "${msp_dir}/asr_ctc/train.py" "${msp_dir}/asr_ctc/hparams/train_asr_ctc.yaml" "${common[@]}" \
            --data_folder="${data_folder}" --prep_folder="${prep}/msp" --skip_prep=True "${msp_opts[@]}" \
            --output_folder="${exp}/asr_ctc_msp" ${asr_args} "${extra[@]}"
    else
        log "Stage 1a: using the given in-domain ASR model ${asr_in_source}"
    fi
    if [ -z "${asr_out_source}" ]; then
        [ -n "${libri_folder}" ] || { echo "--libri_folder or --asr_out_source is needed for the out-of-domain vector" >&2; exit 1; }
        log "Stage 1b: out-of-domain ASR-CTC fine-tuning on LibriSpeech"
        pool_run asr_ctc_libri launch "${root}/recipes/LibriSpeech/asr_ctc/train.py" "${root}/recipes/LibriSpeech/asr_ctc/hparams/train_asr_ctc.yaml" \
            "${common[@]}" --data_folder="${libri_folder}" --prep_folder="${prep}/libri" --skip_prep=True \
            --output_folder="${exp}/asr_ctc_libri" ${asr_args} "${extra[@]}"
    else
        log "Stage 1b: using the given out-of-domain ASR model ${asr_out_source}"
    fi
fi

if [ ${stage} -le 2 ] && [ ${stop_stage} -ge 2 ]; then
    if [ -z "${ser_source}" ]; then
        log "Stage 2: SER fine-tuning on MSP-Podcast"
        pool_run ser launch "${msp_dir}/ser/train.py" "${msp_dir}/ser/hparams/train_ser.yaml" "${common[@]}" \
            --data_folder="${data_folder}" --prep_folder="${prep}/msp" --skip_prep=True "${msp_opts[@]}" \
            --output_folder="${exp}/ser" ${ser_args} "${extra[@]}"
    else
        log "Stage 2: importing the SER model ${ser_source}"
    fi
fi
pool_wait   # the source models are trained before their task vectors are taken

if [ ${stage} -le 3 ] && [ ${stop_stage} -ge 3 ]; then
    log "Stage 3a: task vectors ΔW = W_ft − W_base"
    asr_in=${asr_in_source:-${exp}/asr_ctc_msp/finetuned_wavlm}
    asr_out=${asr_out_source:-${exp}/asr_ctc_libri/finetuned_wavlm}
    ser=${ser_source:-${exp}/ser/finetuned_wavlm}
    [ -n "${asr_in_source}" ] || asr_in_kind=hf
    [ -n "${asr_out_source}" ] || asr_out_kind=hf
    [ -n "${ser_source}" ] || ser_kind=hf
    if node0_begin "stage 3a (task vectors)"; then
        for spec in "ASR ${asr_in} ${asr_in_kind} asr_in" "ASR ${asr_out} ${asr_out_kind} asr_out" "SER ${ser} ${ser_kind} ser"; do
            read -r name src kind out <<< "${spec}"
            if [ -f "${vectors}/${out}.safetensors" ]; then
                log "  ${out}: ${vectors}/${out}.safetensors exists, kept"; continue
            fi
            "${py}" -m tools.extract_task_vector --base "${wavlm_source}" --finetuned "${src}" --kind "${kind}" \
                --name "${name}" --out "${vectors}/${out}.safetensors"
        done
    fi
    node0_end
    for s in "${seed_list[@]}"; do   # seed by seed: a finished seed's table can be read while the next trains
        seeded=("${common[@]/#--seed=*/--seed=${s}}")
        for row in ${rows}; do
            log "Stage 3b: AdaLTM row ${row}, seed ${s}"
            pool_run "${row}_${s}" launch "${recipe_dir}/train.py" "${recipe_dir}/hparams/rows/${row}.yaml" "${seeded[@]}" \
                --data_folder="${data_folder}" --prep_folder="${prep}/msp" --skip_prep=True "${msp_opts[@]}" \
                --exp_folder="${exp}/rows" --vectors_folder="${vectors}" ${adaltm_args} "${extra[@]}"
        done
        for row in ${mtl_rows}; do
            log "Stage 3c: MTL baseline ${row}, seed ${s}"
            pool_run "mtl_${row}_${s}" launch "${msp_dir}/mtl/train.py" "${msp_dir}/mtl/hparams/rows/${row}.yaml" "${seeded[@]}" \
                --data_folder="${data_folder}" --prep_folder="${prep}/msp" --skip_prep=True "${msp_opts[@]}" \
                --exp_folder="${exp}/rows" --vectors_folder="${vectors}" ${mtl_args} "${extra[@]}"
        done
    done
    pool_wait
fi

if [ ${stage} -le 4 ] && [ ${stop_stage} -ge 4 ] && ! is_node0; then
    log "Stage 4: single-process evaluation and tables, on node 0"
elif [ ${stage} -le 4 ] && [ ${stop_stage} -ge 4 ]; then
    log "Stage 4a: reference rows of the source models on the MSP-Podcast test split (${test_splits})"
    results=${exp}/results
    sources=()
    ser_ref=${ser_metrics:-${exp}/ser/metrics.json}
    if [ -f "${ser_ref}" ]; then
        sources+=(--source "SER source (W_SER)=${ser_ref}")
    else
        log "  no SER source row: ${ser_ref} not found (stage 2 writes it; for an imported model give --ser_metrics)"
    fi
    # asr_reference <in|out> <row label> <model>: the model is our ASR recipe's folder (save/ + finetuned_wavlm/),
    # its finetuned_wavlm/ export, or an HF WavLMForCTC (directory or hub id) with its tokenizer
    asr_reference() {
        local which=$1 label=$2 model=$3 args=()
        [ -d "${model}/save" ] || { [ -d "$(dirname "${model}")/save" ] && [ -f "${model}/config.json" ] \
            && model=$(dirname "${model}"); }
        if [ -d "${model}/save" ]; then args=(--exp "${model}"); else args=(--hf_ctc "${model}"); fi
        local out=${results}/sources/asr_${which}/metrics.json
        if [ -f "${out}" ] && [ -f "${out%/*}/asr_predictions.csv" ]; then   # the transcripts: paired WER tests
            log "  ${label}: ${out} exists, kept"
        elif ! "${py}" -m tools.eval_asr "${args[@]}" --manifest "${prep}/msp/test.json" --out "${out}" \
                --device "${device:-cpu}" --batch_size "${eval_batch_size}" --experiment "asr_${which}"; then
            log "  WARNING: no ${label} row: ${model} could not be evaluated as a CTC model (see the error above)"
            return 0
        fi
        sources+=(--source "${label}=${out}")
    }
    asr_reference in "In-domain ASR source (W_ASR_in)" "${asr_in_source:-${exp}/asr_ctc_msp}"
    asr_reference out "Out-of-domain ASR source (W_ASR_out)" "${asr_out_source:-${exp}/asr_ctc_libri}"

    log "Stage 4b: results table and figures (seeds: ${seeds})"
    rows_dir=${exp}/rows
    runs=()                 # rows/<row>/<seed> of the selected seeds
    for d in "${rows_dir}"/*/; do
        for s in "${seed_list[@]}"; do [ -f "${d}${s}/metrics.json" ] && runs+=("${d%/}/${s}"); done
    done
    [ ${#runs[@]} -gt 0 ] || { echo "no row results of the seeds ${seeds} under ${rows_dir}: run stage 3 first" >&2; exit 1; }
    # paired tests of every row against Setup 1 (†) and Setup 4 (‡), where those rows ran
    marks=()
    [ -f "${rows_dir}/setup1_frozen/${seed}/predictions.csv" ] && marks+=(--mark "†=Setup 1: Baseline (Frozen Backbone)")
    [ -f "${rows_dir}/setup4_dual/${seed}/predictions.csv" ] && marks+=(--mark "‡=Setup 4: Proposed Dual-Vector")
    # --wer_mark true: WER (MTL rows, out-of-domain source) against the in-domain ASR source (§), same transcripts
    [ "${wer_mark}" = true ] && [ -f "${results}/sources/asr_in/asr_predictions.csv" ] \
        && marks+=(--mark "§=In-domain ASR source (W_ASR_in)")
    [ ${#marks[@]} -eq 0 ] || marks+=(--significance "${results}/table_significance")
    figures=("${rows_dir}/setup4_dual/${seed}" "${rows_dir}/setup2_asr_only/${seed}" "${rows_dir}/setup3_ser_only/${seed}"
             "${rows_dir}/out_of_domain_dual/${seed}")
    multi=()                # several seeds: the per-row seed table, figures as mean with a band
    if [ ${#seed_list[@]} -gt 1 ]; then
        multi=(--seeds_table "${results}/table_seeds")
        figures=("${figures[@]%/*}")
    fi
    "${py}" -m tools.collect_results "${runs[@]}" "${sources[@]}" --out "${results}/table" "${marks[@]}" "${multi[@]}"
    plot_seeds=(); [ ${#seed_list[@]} -eq 1 ] || plot_seeds=(--seeds "${seed_list[@]}")
    coef_runs=()            # the runs with λ / α (AdaLTM rows; the MTL rows have none)
    for r in "${runs[@]}"; do [ -f "${r}/coefficients.json" ] && coef_runs+=("${r}"); done
    "${py}" -m tools.plot_coefficients "${coef_runs[@]}" --out "${results}/plots" "${plot_seeds[@]}" \
        --figure2 "${figures[0]}" "${figures[1]}" "${figures[2]}" --figure3 "${figures[0]}" "${figures[3]}"
    log "results: ${results}/table.md$([ ${#marks[@]} -eq 0 ] || echo ", marked: ${results}/table_significance.md")" \
        "$([ ${#multi[@]} -eq 0 ] || echo "; over seeds: ${results}/table_seeds.md");" \
        "Figure 2 / 3: ${results}/plots/figure{2,3}_*.png"
    cat "${results}/table.md"
    [ ${#multi[@]} -eq 0 ] || cat "${results}/table_seeds.md"
fi
