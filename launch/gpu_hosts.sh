#!/usr/bin/env bash
# Several GPU hosts: run this on every host (one command per host); jax.distributed joins them.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/gpu_hosts.sh [SETTINGS] [-- MAIN_FLAGS...]

Run the same command on every host, changing only --host_index: one process per host
drives all of that host's GPUs, and jax.distributed connects the processes through the
coordinator (host 0). Each host reads its own share of the data; the workdir must be a
folder every host sees (NFS, Filestore, a parallel filesystem). Install on every host
first, e.g. with `launch/gpu_host.sh install`. Run `prepare` once, on one host, with
launch/gpu_host.sh.

Settings (a flag, or the environment variable in brackets):
  --coordinator HOST:PORT  address of host 0, reachable from every host, with a free
                           port [SATSYNTH_COORDINATOR]
  --num_hosts N            number of hosts (processes) [SATSYNTH_NUM_PROCESSES]
  --host_index I           this host, 0 .. N-1; 0 runs on the coordinator [SATSYNTH_PROCESS_ID]
  --mode MODE              one of the modes below, except prepare
  --config PATH            config file, e.g. configs/loveda.py
  --workdir DIR            shared folder for every output of the run
  --venv DIR               virtual environment (default: .venv-gpu in the checkout) [SATSYNTH_VENV]
  -h, --help               this text

Modes (--mode):
USAGE
  modes_help
  cat <<'USAGE'

Example (2 hosts of 8 GPUs; the global batch is split over all 16):
  # on host 0 (10.0.0.1):
  launch/gpu_hosts.sh --coordinator 10.0.0.1:12355 --num_hosts 2 --host_index 0 \
      --mode train_diffusion --config configs/loveda.py --workdir /shared/loveda
  # on host 1:
  launch/gpu_hosts.sh --coordinator 10.0.0.1:12355 --num_hosts 2 --host_index 1 \
      --mode train_diffusion --config configs/loveda.py --workdir /shared/loveda
USAGE
}

coordinator="${SATSYNTH_COORDINATOR:-}"
num_hosts="${SATSYNTH_NUM_PROCESSES:-}"
host_index="${SATSYNTH_PROCESS_ID:-}"
venv="${SATSYNTH_VENV:-${REPO_ROOT}/.venv-gpu}"
mode=""
config=""
workdir=""
main_flags=()

while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --) shift; main_flags=("$@"); break ;;
    --coordinator | --coordinator=*) flag_value "$@"; coordinator="${FLAG_VALUE}"; shift "${VALUE_SHIFT}" ;;
    --num_hosts | --num_hosts=*) flag_value "$@"; num_hosts="${FLAG_VALUE}"; shift "${VALUE_SHIFT}" ;;
    --host_index | --host_index=*) flag_value "$@"; host_index="${FLAG_VALUE}"; shift "${VALUE_SHIFT}" ;;
    --mode | --mode=*) flag_value "$@"; mode="${FLAG_VALUE}"; shift "${VALUE_SHIFT}" ;;
    --config | --config=*) flag_value "$@"; config="${FLAG_VALUE}"; shift "${VALUE_SHIFT}" ;;
    --workdir | --workdir=*) flag_value "$@"; workdir="${FLAG_VALUE}"; shift "${VALUE_SHIFT}" ;;
    --venv | --venv=*) flag_value "$@"; venv="${FLAG_VALUE}"; shift "${VALUE_SHIFT}" ;;
    *) die "unknown argument $1; see --help" ;;
  esac
done

require "${coordinator}" --coordinator SATSYNTH_COORDINATOR
require "${num_hosts}" --num_hosts SATSYNTH_NUM_PROCESSES
require "${host_index}" --host_index SATSYNTH_PROCESS_ID
require "${mode}" --mode
require "${config}" --config
require "${workdir}" --workdir
require "${venv}" --venv SATSYNTH_VENV
[[ "${coordinator}" =~ ^[^:]+:[0-9]+$ ]] || die "--coordinator must be HOST:PORT, got '${coordinator}'"
require_integer "${num_hosts}" --num_hosts 1
require_integer "${host_index}" --host_index 0
((host_index < num_hosts)) || die "--host_index must be below --num_hosts=${num_hosts}, got ${host_index}"
require_mode "${mode}"
[[ "${mode}" != prepare ]] || die "run prepare once, on one host: launch/gpu_host.sh run --mode prepare ..."
[[ -x "${venv}/bin/python" ]] || die "no Python in --venv ${venv}: run 'launch/gpu_host.sh install' first"

cd "${REPO_ROOT}"
exec "${venv}/bin/python" -m satsynth_jax.main --distributed=on --coordinator_address="${coordinator}" \
  --num_processes="${num_hosts}" --process_id="${host_index}" --mode="${mode}" --config="${config}" \
  --workdir="${workdir}" ${main_flags[@]+"${main_flags[@]}"}
