# Shared pieces of the recipes' staged run.sh (ESPnet style). Source it after declaring the options with their
# defaults, from the recipe's run.sh, with no arguments, so that it reads and shifts the caller's "$@":
#
#   root=...
#   # ------------------------------------------------ options
#   stage=0                # first stage to run         <- one "name=default  # comment" line per option:
#   exp=exp/my_recipe      # everything it writes          --help lists them with their comments
#   . "${root}/tools/recipe_lib.sh"  # --name value for every declared option; what follows -- stays in "$@"
#
# After it: log, launch, pool_start / pool_run / pool_wait / cpu_jobs (a stage's jobs side by side: --nj), is_node0,
# node0_begin, node0_end and ${py} are defined, the working directory is ${root}, and ${root} is on PYTHONPATH. The full command line is logged and, when the recipe declares ${exp}, written (by
# node 0) to ${exp}/run_cmd.sh (a script that replays this invocation; ESPnet keeps the same record) and appended to
# ${exp}/run_cmd.history. PYTORCH_CUDA_ALLOC_CONF is expandable_segments:True unless the caller set it (or
# PYTORCH_ALLOC_CONF): segments that grow in place instead of many fixed-size blocks waste less memory on
# utterances of varying length.
#
# Several machines (every run.sh declares nnodes, node_rank, master_addr, master_port, node_timeout): run.sh runs
# on every node, with the same options but --node_rank, over a filesystem that every node sees at the same paths
# (${exp}, the data, the models). Each launch is torchrun's static rendezvous (--nnodes --node_rank --master_addr
# --master_port; --standalone only on one node). Steps that write shared files run on node 0 only; the others wait:
#
#   if node0_begin "stage 0 (data preparation)"; then   # true on node 0 only
#       ...                                              # prepare, generate, extract
#   fi
#   node0_end                                            # every node: continue once node 0 is there
#
# node0_end is a torchrun job of tools/node_sync.py on every node (the rendezvous is the barrier): the others wait up
# to ${node_timeout} s for node 0; if node 0 fails inside the step, its exit trap tells them and they stop too.

if [ -z "${BASH_VERSINFO:-}" ] || [ "${BASH_VERSINFO[0]}" -lt 4 ]; then   # associative arrays, mapfile
    echo "the recipes need bash 4 or newer (this is ${BASH_VERSION:-not bash}); on macOS: brew install bash" >&2
    exit 1
fi

log() { echo -e "$(date '+%Y-%m-%dT%H:%M:%S') (${BASH_SOURCE[1]##*/}:${BASH_LINENO[0]}) $*"; }

# The option lines of a run.sh: from its "# ---- options" line to the line sourcing this file, every
# "name=default  # comment" at the start of a line. Printed by --help as "--name <default>  comment".
recipe_usage() {  # recipe_usage <run.sh>
    local script=$1
    echo "Usage: ${script##*/} [--option value ...] [-- key=value overrides for train.py]"
    echo
    sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "${script}"   # the header comment: stages and examples
    echo
    echo "Options (default in angle brackets):"
    awk '
        /^# -+ *options/ { on = 1; next }
        /recipe_lib\.sh/ { on = 0 }
        on && /^[A-Za-z_][A-Za-z0-9_]*=/ {
            eq = index($0, "="); name = substr($0, 1, eq - 1); rest = substr($0, eq + 1)
            while (rest ~ /\\$/ && (getline more) > 0) rest = substr(rest, 1, length(rest) - 1) more  # continued line
            comment = ""
            if (match(rest, /[ \t]+#[ \t]?/)) { comment = substr(rest, RSTART + RLENGTH); rest = substr(rest, 1, RSTART - 1) }
            gsub(/^["\047]|["\047]$/, "", rest)
            printf "  --%s <%s>\n", name, rest
            if (comment != "") printf "        %s\n", comment
        }' "${script}"
}

_recipe_script=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)/$(basename "${BASH_SOURCE[1]}")
_recipe_cwd=$(pwd)
_recipe_args=("$@")

# --name value sets an option the recipe declared (an unknown name is an error, not a new variable)
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) recipe_usage "${_recipe_script}"; exit 0 ;;
        --) shift; break ;;
        --*) name=${1#--}; [ $# -ge 2 ] || { echo "option $1 needs a value" >&2; exit 1; }
             if ! declare -p "${name}" >/dev/null 2>&1; then echo "unknown option $1" >&2; exit 1; fi
             printf -v "${name}" '%s' "$2"; shift 2 ;;
        *) echo "unexpected argument $1 (train.py overrides go after --)" >&2; exit 1 ;;
    esac
done

for _v in nnodes node_rank master_addr master_port node_timeout; do
    declare -p "${_v}" >/dev/null 2>&1 \
        || { echo "${_recipe_script}: declares no option ${_v} (every run.sh has nnodes, node_rank, master_addr," \
                  "master_port, node_timeout)" >&2; exit 1; }
done
for _v in nnodes node_rank master_port node_timeout; do
    [[ ${!_v} =~ ^[0-9]+$ ]] || { echo "--${_v} must be a non-negative integer, not '${!_v}'" >&2; exit 1; }
done
[ "${nnodes}" -ge 1 ] || { echo "--nnodes must be at least 1" >&2; exit 1; }
[ "${master_port}" -ge 1 ] && [ "${master_port}" -le 65534 ] \
    || { echo "--master_port must be in 1..65534 (the next port is used too), not ${master_port}" >&2; exit 1; }
[ "${node_rank}" -lt "${nnodes}" ] || { echo "--node_rank ${node_rank} is not in 0..$((nnodes - 1)) (--nnodes ${nnodes})" >&2; exit 1; }
if [ "${nnodes}" -gt 1 ] && [ -z "${master_addr}" ]; then
    echo "--master_addr (node 0's host name or address, the same on every node) is needed with --nnodes ${nnodes}" >&2
    exit 1
fi

cd "${root}"
_recipe_cmd=$(printf '%q' "${_recipe_script}"; [ ${#_recipe_args[@]} -eq 0 ] || printf ' %q' "${_recipe_args[@]}")
log "command line (from ${_recipe_cwd}): bash ${_recipe_cmd}"
[ "${nnodes}" -eq 1 ] || log "node ${node_rank} of ${nnodes}; rendezvous at ${master_addr}:${master_port}"
# a replayable record of this invocation, written once (node 0) on the shared filesystem
if declare -p exp >/dev/null 2>&1 && [ -n "${exp}" ] && [ "${node_rank}" -eq 0 ]; then
    mkdir -p "${exp}"
    {
        echo "#!/usr/bin/env bash"
        echo "# $(date '+%Y-%m-%dT%H:%M:%S') on $(hostname): replays this run of ${_recipe_script#"${root}"/}"
        echo "# git: $(git -C "${root}" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "${root}" diff --quiet HEAD 2>/dev/null || echo ' (+ local changes)')"
        printf 'cd %q && %sbash %s "$@"\n' "${_recipe_cwd}" "${PYTHON:+PYTHON=$(printf '%q' "${PYTHON}") }" "${_recipe_cmd}"
    } > "${exp}/.run_cmd.sh.tmp" && mv "${exp}/.run_cmd.sh.tmp" "${exp}/run_cmd.sh"
    chmod +x "${exp}/run_cmd.sh"
    tail -n 1 "${exp}/run_cmd.sh" | sed "s/^/$(date '+%Y-%m-%dT%H:%M:%S') /" >> "${exp}/run_cmd.history"
    log "command written to ${exp}/run_cmd.sh (history: ${exp}/run_cmd.history)"
fi
py=${PYTHON:-python}
[ -x "${root}/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && py="${root}/.venv/bin/python"
export PYTHONPATH="${root}${PYTHONPATH:+:${PYTHONPATH}}"
[ -n "${PYTORCH_ALLOC_CONF:-}" ] || export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

# last_wins ARG...: the ARGs, each --key=value kept at its last occurrence only (NUL-separated). hyperpyyaml refuses
# a key given twice, and a recipe's --mini defaults, its *_args options and the args after -- may each set the same key.
last_wins() {
    local -A seen=()
    local out=() i a
    for ((i = $#; i >= 1; i--)); do
        a=${!i}
        if [[ ${a} == --*=* ]]; then
            [ -n "${seen[${a%%=*}]:-}" ] && continue
            seen[${a%%=*}]=1
        fi
        out=("${a}" "${out[@]}")
    done
    [ ${#out[@]} -eq 0 ] || printf '%s\0' "${out[@]}"
}

# ---------------------------------------------------------------------------------------------- several nodes
_node_runs=0      # torchrun jobs started so far: the same sequence on every node
_node0_step=      # node 0: the shared step it is inside (its exit trap reports a failure there to the others)

# The rendezvous options of the next multi-node torchrun job. Consecutive jobs alternate between master_port and
# master_port + 1: a node that leaves job k early can never reach node 0's store of job k while it is shutting
# down, since that store lives on the other port (job k - 1's, long gone, on this one).
_node_rdzv() {  # sets _rdzv (in this shell: the job counter must advance here, not in a subshell)
    _rdzv=(--nnodes="${nnodes}" --node_rank="${node_rank}" --master_addr="${master_addr}"
           --master_port="$((master_port + _node_runs % 2))" --rdzv_conf="timeout=${node_timeout}")
    _node_runs=$((_node_runs + 1))
}

is_node0() { [ "${node_rank}" -eq 0 ]; }

node0_begin() {  # node0_begin <what>: true on node 0, which then runs the step; false on the others
    _node0_step=$1
    is_node0 && return 0
    log "node ${node_rank}: node 0 runs ${1}; waiting for it (at most ${node_timeout} s)"
    return 1
}

_node_sync() {  # _node_sync <what> <status>: every node meets node 0, which passes its status on
    local what=$1 status=$2 out rc=0
    _node_rdzv
    out=$("${py}" -m torch.distributed.run "${_rdzv[@]}" --nproc_per_node=1 -m tools.node_sync --what "${what}" \
        --status "${status}" --timeout "${node_timeout}" 2>&1) || rc=$?
    [ "${rc}" -eq 0 ] && return 0
    [ "${status}" -eq 0 ] || return 1  # node 0 reporting its own failure: its error is already in the log
    if grep -q "^node [0-9]*: node 0 failed" <<< "${out}"; then
        grep "^node [0-9]*: node 0 failed" <<< "${out}" >&2
    else
        echo "${out}" | tail -n 15 >&2
        if is_node0; then
            echo "node 0: not every node reached the end of ${what} within ${node_timeout} s (--node_timeout)" >&2
        else
            echo "node ${node_rank}: no word from node 0 at ${master_addr}:${master_port} (or +1) after ${what}" \
                 "within ${node_timeout} s (--node_timeout): it failed or is still busy; see its log" >&2
        fi
    fi
    return 1
}

node0_end() {  # every node: wait until node 0 has finished the step opened by node0_begin
    local what=${_node0_step:-the step of node 0}
    _node0_step=
    [ "${nnodes}" -eq 1 ] || _node_sync "${what}" 0 || exit 1
}

_node0_exit() {  # EXIT trap on node 0: a step that failed stops the nodes waiting for it
    local rc=$? step=${_node0_step}
    _node0_step=
    if [ "${rc}" -ne 0 ] && [ -n "${step}" ]; then
        log "node 0 failed in ${step} (exit status ${rc}): telling the other nodes"
        _node_sync "${step}" "${rc}" || true
    fi
    exit "${rc}"
}
if [ "${nnodes}" -gt 1 ] && is_node0; then trap _node0_exit EXIT; fi

# ------------------------------------------------------------------------------ jobs of one stage at once (--nj)
# A stage's independent runs (the source models, the rows x seeds) can run side by side, as ESPnet's --nj does for
# data jobs. Each run is the same process it would be alone (same arguments, one intra-op thread with --mini), so
# its results do not depend on nj; only the wall time does.
#
#   pool_start <logdir>          # before the first job (reads ${nj}: a run.sh that declares no nj gets 1)
#   pool_run <name> launch ...   # nj 1: runs now, output to the terminal; nj > 1: in the background, output in
#                                # <logdir>/<name>.log, at most nj at once (waits for a free slot first)
#   pool_wait                    # every job has ended; a failed one has its log tail printed, then exit 1
#
# With nj > 1 and GPUs (device not cpu, nvidia-smi present), job slot s sees only GPUs s*ngpu .. (s+1)*ngpu-1 of
# CUDA_VISIBLE_DEVICES (or of all GPUs): nj x ngpu GPUs are needed, checked before the first job. One node only:
# the nodes' rendezvous sequence must be the same everywhere, which background jobs would not keep.
cpu_jobs() {  # how many one-thread CPU jobs fit: one per core, at most one per 2 GiB available (a mini run: 1.5)
    local cores mem
    cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)   # nproc alone reports OMP_NUM_THREADS
    mem=$(awk '/^MemAvailable:/ { print int($2 / 2097152) }' /proc/meminfo 2>/dev/null || echo 1)
    [ "${mem:-0}" -lt "${cores}" ] && cores=${mem:-1}
    echo $(( cores > 1 ? cores : 1 ))
}

_pool_n=1 _pool_dir= _pool_gpus=()
declare -A _pool_job=() _pool_t0=()                  # pid -> name, pid -> start time
declare -A _pool_names=()                               # every job name given so far
_pool_slots=()                                        # slot -> pid ('' = free)
_pool_failed=()

pool_start() {  # pool_start <logdir>
    _pool_dir=$1 _pool_gpus=() _pool_failed=()
    _pool_n=${nj:-1}
    [[ ${_pool_n} =~ ^[1-9][0-9]*$ ]] || { echo "--nj must be a positive integer, not '${_pool_n}'" >&2; exit 1; }
    [ "${_pool_n}" -eq 1 ] && return 0
    if [ "${nnodes}" -gt 1 ]; then
        echo "--nj ${_pool_n} needs one node (--nnodes ${nnodes}): run the jobs of a stage one after another" >&2
        exit 1
    fi
    mkdir -p "${_pool_dir}"
    if [ "${device:-}" != cpu ] && command -v nvidia-smi >/dev/null 2>&1; then
        local all=() need=$((_pool_n * ${ngpu:-1}))
        if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then IFS=, read -r -a all <<< "${CUDA_VISIBLE_DEVICES}"
        else mapfile -t all < <(nvidia-smi --query-gpu=index --format=csv,noheader); fi
        if [ ${#all[@]} -gt 0 ]; then
            [ ${#all[@]} -ge "${need}" ] || { echo "--nj ${_pool_n} x --ngpu ${ngpu:-1} needs ${need} GPUs;" \
                "${#all[@]} visible (${all[*]}): lower --nj" >&2; exit 1; }
            _pool_gpus=("${all[@]}")
        fi
    fi
    trap '_pool_kill 130' INT
    trap '_pool_kill 143' TERM
}

_pool_kill() {  # _pool_kill <exit status>: on Ctrl-C / TERM the background jobs stop with the recipe
    local pid
    for pid in "${!_pool_job[@]}"; do   # the job's processes (python, torchrun), then its subshell
        pkill -TERM -P "${pid}" 2>/dev/null || true
        kill -TERM "${pid}" 2>/dev/null || true
    done
    exit "$1"
}

_pool_reap() {  # wait for one background job to end; free its slot, record a failure
    local pid= rc=0 p
    # RECIPE_LIB_POLL=1 takes the bash < 5.1 path on any bash (tests/test_run_sh.py)
    if [ -z "${RECIPE_LIB_POLL:-}" ] && (( BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 501 )); then
        wait -n -p pid "${!_pool_job[@]}" || rc=$?
    else   # bash 4.x-5.0: no wait -p; poll for a job that has ended, then collect its status
        while [ -z "${pid}" ]; do
            for p in "${!_pool_job[@]}"; do kill -0 "${p}" 2>/dev/null || { pid=${p}; break; }; done
            [ -n "${pid}" ] || sleep 1
        done
        wait "${pid}" || rc=$?
    fi
    local name=${_pool_job[${pid}]} slot
    for slot in "${!_pool_slots[@]}"; do [ "${_pool_slots[slot]}" != "${pid}" ] || _pool_slots[slot]=; done
    if [ "${rc}" -eq 0 ]; then
        local t0=${_pool_t0[${pid}]}
        log "  ${name}: done in $(( $(date +%s) - t0 )) s"
    else
        log "  ${name}: FAILED (exit status ${rc}); last lines of ${_pool_dir}/${name}.log:"
        tail -n 25 "${_pool_dir}/${name}.log" >&2
        _pool_failed+=("${name}")
    fi
    unset "_pool_job[${pid}]" "_pool_t0[${pid}]"
}

pool_run() {  # pool_run <name> <command...>
    local name=$1; shift
    if [ -n "${_pool_names[${name}]:-}" ]; then   # the same run twice would share its output folder and log
        echo "job ${name} given twice (a row, fold or seed listed twice?)" >&2
        exit 1
    fi
    _pool_names[${name}]=1
    if [ "${_pool_n}" -eq 1 ]; then "$@"; return; fi
    while [ ${#_pool_job[@]} -ge "${_pool_n}" ]; do _pool_reap; done
    local slot=0
    while [ -n "${_pool_slots[slot]:-}" ]; do slot=$((slot + 1)); done
    local gpus=()
    [ ${#_pool_gpus[@]} -eq 0 ] || gpus=("CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${_pool_gpus[*]:slot * ${ngpu:-1}:${ngpu:-1}}")")
    ( [ ${#gpus[@]} -eq 0 ] || export "${gpus[@]}"; "$@" ) < /dev/null > "${_pool_dir}/${name}.log" 2>&1 &
    _pool_slots[slot]=$! _pool_job[$!]=${name} _pool_t0[$!]=$(date +%s)
    log "  ${name}: started (job slot ${slot}${gpus:+, ${gpus[0]}}; log ${_pool_dir}/${name}.log)"
}

pool_wait() {  # every started job has ended; exit 1 naming the failed ones
    while [ ${#_pool_job[@]} -gt 0 ]; do _pool_reap; done
    if [ ${#_pool_failed[@]} -gt 0 ]; then
        log "failed: ${_pool_failed[*]} (logs in ${_pool_dir})" >&2
        exit 1
    fi
}

launch() {  # launch <train.py> <hparams> [overrides...]: one process, or torchrun over ${ngpu} GPUs x ${nnodes} nodes
    local args=()
    mapfile -d '' args < <(last_wins "$@")   # a later --key=value overrides an earlier one
    set -- "${args[@]}"
    local backend=(); [ "${device}" = cpu ] && backend=(--distributed_backend=gloo)
    if [ "${nnodes}" -gt 1 ]; then
        _node_rdzv
        "${py}" -m torch.distributed.run "${_rdzv[@]}" --nproc_per_node="${ngpu}" "$@" "${backend[@]}"
    elif [ "${ngpu}" -gt 1 ]; then
        "${py}" -m torch.distributed.run --standalone --nproc_per_node="${ngpu}" "$@" "${backend[@]}"
    else
        "${py}" "$@"
    fi
}
