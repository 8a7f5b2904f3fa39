#!/usr/bin/env bash
# One host with several GPUs: one process drives all of them (data parallel over the local mesh).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/gpu_host.sh COMMAND [SETTINGS] [-- MAIN_FLAGS...]

One process uses every visible GPU of this host: the global batch is split over them and
no jax.distributed set-up is needed.

Commands:
  install  create --venv and pip-install this checkout with jax[cuda12] into it
  run      run --mode; MAIN_FLAGS after `--` are passed on, e.g. -- --config.diffusion.train.batch_size=256

Settings (a flag, or the environment variable in brackets):
  --venv DIR       virtual environment (default: .venv-gpu in the checkout) [SATSYNTH_VENV]
  --mode MODE      one of the modes below (run)
  --config PATH    config file, e.g. configs/loveda.py (run)
  --workdir DIR    every output of the run goes under it (run)
  --gpus LIST      GPUs to use, e.g. 0,1,2,3 (default: all; sets CUDA_VISIBLE_DEVICES) (run)
  -h, --help       this text

Modes (--mode):
USAGE
  modes_help
  cat <<'USAGE'

Example (8 GPUs):
  launch/gpu_host.sh install
  launch/gpu_host.sh run --mode prepare --config configs/loveda.py --workdir runs/loveda \
      -- --config.data.source_dir=/data/LoveDA
  launch/gpu_host.sh run --mode train_diffusion --config configs/loveda.py --workdir runs/loveda \
      -- --config.diffusion.train.batch_size=256
USAGE
}

command_name=""
venv="${SATSYNTH_VENV:-${REPO_ROOT}/.venv-gpu}"
mode=""
config=""
workdir=""
gpus=""
main_flags=()

while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --) shift; main_flags=("$@"); break ;;
    --venv | --venv=*) flag_value "$@"; venv="${FLAG_VALUE}"; shift "${VALUE_SHIFT}" ;;
    --mode | --mode=*) flag_value "$@"; mode="${FLAG_VALUE}"; shift "${VALUE_SHIFT}" ;;
    --config | --config=*) flag_value "$@"; config="${FLAG_VALUE}"; shift "${VALUE_SHIFT}" ;;
    --workdir | --workdir=*) flag_value "$@"; workdir="${FLAG_VALUE}"; shift "${VALUE_SHIFT}" ;;
    --gpus | --gpus=*) flag_value "$@"; gpus="${FLAG_VALUE}"; shift "${VALUE_SHIFT}" ;;
    -*) die "unknown flag $1; see --help" ;;
    *)
      [[ -z "${command_name}" ]] || die "one command at a time, got '${command_name}' and '$1'"
      command_name="$1"; shift ;;
  esac
done

require "${venv}" --venv SATSYNTH_VENV
if [[ -n "${mode}" ]]; then require_mode "${mode}"; fi
if [[ -n "${gpus}" ]]; then
  require_pattern "${gpus}" --gpus '^[A-Za-z0-9-]+(,[A-Za-z0-9-]+)*$' "GPU indices or UUIDs joined by ',', e.g. 0,1,2,3"
fi
case "${command_name}" in
  install)
    python3 -m venv "${venv}"
    "${venv}/bin/pip" install -q --upgrade pip
    "${venv}/bin/pip" install -q 'jax[cuda12]' -e "${REPO_ROOT}"
    echo "installed into ${venv}" ;;
  run)
    require "${mode}" --mode
    require "${config}" --config
    require "${workdir}" --workdir
    [[ -x "${venv}/bin/python" ]] || die "no Python in --venv ${venv}: run '$0 install' first"
    if [[ -n "${gpus}" ]]; then export CUDA_VISIBLE_DEVICES="${gpus}"; fi
    cd "${REPO_ROOT}"
    exec "${venv}/bin/python" -m satsynth_jax.main --distributed=off --mode="${mode}" --config="${config}" \
      --workdir="${workdir}" ${main_flags[@]+"${main_flags[@]}"} ;;
  "") die "missing COMMAND (install or run); see --help" ;;
  *) die "unknown COMMAND '${command_name}': use install or run" ;;
esac
