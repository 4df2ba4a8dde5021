# Shared pieces of the recipes' staged run.sh (ESPnet style). Source it after declaring the options with their
# defaults, from the recipe's run.sh, with no arguments, so that it reads and shifts the caller's "$@":
#
#   root=...
#   # ------------------------------------------------ options
#   stage=0                # first stage to run         <- one "name=default  # comment" line per option:
#   exp=exp/my_recipe      # everything it writes          --help lists them with their comments
#   . "${root}/tools/recipe_lib.sh"  # --name value for every declared option; what follows -- stays in "$@"
#
# After it: log, launch and ${py} are defined, the working directory is ${root}, and ${root} is on PYTHONPATH.
# The full command line is logged and, when the recipe declares ${exp}, written to ${exp}/run_cmd.sh (a script that
# replays this invocation; ESPnet keeps the same record) and appended to ${exp}/run_cmd.history.

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

cd "${root}"
_recipe_cmd=$(printf '%q' "${_recipe_script}"; [ ${#_recipe_args[@]} -eq 0 ] || printf ' %q' "${_recipe_args[@]}")
log "command line (from ${_recipe_cwd}): bash ${_recipe_cmd}"
if declare -p exp >/dev/null 2>&1 && [ -n "${exp}" ]; then  # a replayable record of this invocation
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

launch() {  # launch <train.py> <hparams> [overrides...]: one process, or torchrun over ${ngpu} GPUs
    local args=()
    mapfile -d '' args < <(last_wins "$@")   # a later --key=value overrides an earlier one
    set -- "${args[@]}"
    if [ "${ngpu}" -gt 1 ]; then
        local backend=(); [ "${device}" = cpu ] && backend=(--distributed_backend=gloo)
        "${py}" -m torch.distributed.run --standalone --nproc_per_node="${ngpu}" "$@" "${backend[@]}"
    else
        "${py}" "$@"
    fi
}
