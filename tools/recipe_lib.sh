# Shared pieces of the recipes' staged run.sh (ESPnet style). Source it after declaring the options with their
# defaults, from the recipe's run.sh, with no arguments, so that it reads and shifts the caller's "$@":
#
#   root=...; stage=0; ...           # options with defaults
#   . "${root}/tools/recipe_lib.sh"  # --name value for every declared option; what follows -- stays in "$@"
#
# After it: log, launch and ${py} are defined, the working directory is ${root}, and ${root} is on PYTHONPATH.

log() { echo -e "$(date '+%Y-%m-%dT%H:%M:%S') (${BASH_SOURCE[1]##*/}:${BASH_LINENO[0]}) $*"; }

# --name value sets an option the recipe declared (an unknown name is an error, not a new variable)
while [ $# -gt 0 ]; do
    case "$1" in
        --) shift; break ;;
        --*) name=${1#--}; [ $# -ge 2 ] || { echo "option $1 needs a value" >&2; exit 1; }
             if ! declare -p "${name}" >/dev/null 2>&1; then echo "unknown option $1" >&2; exit 1; fi
             printf -v "${name}" '%s' "$2"; shift 2 ;;
        *) echo "unexpected argument $1 (train.py overrides go after --)" >&2; exit 1 ;;
    esac
done

cd "${root}"
py=${PYTHON:-python}
[ -x "${root}/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && py="${root}/.venv/bin/python"
export PYTHONPATH="${root}${PYTHONPATH:+:${PYTHONPATH}}"

launch() {  # launch <train.py> <hparams> [overrides...]: one process, or torchrun over ${ngpu} GPUs
    if [ "${ngpu}" -gt 1 ]; then
        local backend=(); [ "${device}" = cpu ] && backend=(--distributed_backend=gloo)
        "${py}" -m torch.distributed.run --standalone --nproc_per_node="${ngpu}" "$@" "${backend[@]}"
    else
        "${py}" "$@"
    fi
}
