#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice): create, install, run a mode on every worker, fetch, delete.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu_vm.sh COMMAND [SETTINGS] [-- MAIN_FLAGS...]

Drives a Cloud TPU VM with gcloud. Every worker (host) of the slice runs one process;
`run` starts them together and jax.distributed connects them (--distributed=on).

Commands:
  create   create the TPU VM; with --queued, a queued resource, waiting until it is ACTIVE
  install  copy this checkout to every worker, pip-install it with jax[tpu] into ~/satsynth_venv
           (and, with --nfs, mount the shared workdir filesystem at /mnt/satsynth)
  run      run --mode on every worker (prepare: on worker 0 only); MAIN_FLAGS after `--`
           are passed on, e.g. -- --config.diffusion.train.batch_size=256
  fetch    copy process 0's outputs (--what) from the workdir into --dest
  delete   delete the TPU VM (or the queued resource with --queued)

Settings (a flag, or the environment variable in brackets):
  --project ID            Google Cloud project [SATSYNTH_PROJECT]             all commands
  --zone ZONE             e.g. us-central2-b [SATSYNTH_ZONE]                  all commands
  --tpu NAME              TPU VM (and queued resource) name [SATSYNTH_TPU]   all commands
  --accelerator_type T    e.g. v4-8, v4-32, v5litepod-16 [SATSYNTH_ACCELERATOR_TYPE]    create
  --runtime_version V     TPU software version, e.g. tpu-ubuntu2204-base; list them with
                          `gcloud compute tpus versions list --zone ZONE` [SATSYNTH_RUNTIME_VERSION] create
  --queued                use a queued resource (create, delete)
  --spot                  Spot capacity (create)
  --wait_minutes N        how long create --queued waits for ACTIVE (default 60)
  --nfs SERVER:/EXPORT    NFS / Filestore share to mount at /mnt/satsynth on every worker (install)
  --mode MODE             one of the modes below (run)
  --config PATH           config file inside the checkout, e.g. configs/loveda.py (run)
  --workdir DIR           on the workers; on a pod slice a folder every worker shares,
                          e.g. /mnt/satsynth/loveda (run, fetch)
  --detach                run: start the job under nohup and return; its log is
                          ~/satsynth_MODE.log on every worker
  --dest DIR              local folder for fetch (default: ./results)
  --what "A B"            workdir subfolders to fetch (default: "metrics samples report")
  -h, --help              this text

Names, zones and versions must be plain (letters, digits, '-', '.'); every other value is
quoted for the workers' shell, so it arrives there as one literal word.

Modes (--mode):
USAGE
  modes_help
  cat <<'USAGE'

Example (a v4-32 slice: 4 workers, 16 chips):
  export SATSYNTH_PROJECT=my-project SATSYNTH_ZONE=us-central2-b SATSYNTH_TPU=satsynth
  launch/tpu_vm.sh create --accelerator_type v4-32 --runtime_version tpu-ubuntu2204-base
  launch/tpu_vm.sh install --nfs 10.0.0.2:/satsynth
  launch/tpu_vm.sh run --mode prepare --config configs/loveda.py --workdir /mnt/satsynth/loveda \
      -- --config.data.source_dir=/mnt/satsynth/downloads/LoveDA
  launch/tpu_vm.sh run --mode train_diffusion --config configs/loveda.py --workdir /mnt/satsynth/loveda \
      --detach -- --config.diffusion.train.batch_size=256
  launch/tpu_vm.sh fetch --workdir /mnt/satsynth/loveda --dest results/loveda
  launch/tpu_vm.sh delete
USAGE
}

command_name=""
project="${SATSYNTH_PROJECT:-}"
zone="${SATSYNTH_ZONE:-}"
tpu="${SATSYNTH_TPU:-}"
accelerator_type="${SATSYNTH_ACCELERATOR_TYPE:-}"
runtime_version="${SATSYNTH_RUNTIME_VERSION:-}"
queued=false
spot=false
wait_minutes=60
nfs=""
mode=""
config=""
workdir=""
detach=false
dest="results"
what="metrics samples report"
main_flags=()

while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --) shift; main_flags=("$@"); break ;;
    --project | --project=*) flag_value "$@"; project="${FLAG_VALUE}"; shift "${VALUE_SHIFT}" ;;
    --zone | --zone=*) flag_value "$@"; zone="${FLAG_VALUE}"; shift "${VALUE_SHIFT}" ;;
    --tpu | --tpu=*) flag_value "$@"; tpu="${FLAG_VALUE}"; shift "${VALUE_SHIFT}" ;;
    --accelerator_type | --accelerator_type=*)
      flag_value "$@"; accelerator_type="${FLAG_VALUE}"; shift "${VALUE_SHIFT}" ;;
    --runtime_version | --runtime_version=*) flag_value "$@"; runtime_version="${FLAG_VALUE}"; shift "${VALUE_SHIFT}" ;;
    --wait_minutes | --wait_minutes=*) flag_value "$@"; wait_minutes="${FLAG_VALUE}"; shift "${VALUE_SHIFT}" ;;
    --nfs | --nfs=*) flag_value "$@"; nfs="${FLAG_VALUE}"; shift "${VALUE_SHIFT}" ;;
    --mode | --mode=*) flag_value "$@"; mode="${FLAG_VALUE}"; shift "${VALUE_SHIFT}" ;;
    --config | --config=*) flag_value "$@"; config="${FLAG_VALUE}"; shift "${VALUE_SHIFT}" ;;
    --workdir | --workdir=*) flag_value "$@"; workdir="${FLAG_VALUE}"; shift "${VALUE_SHIFT}" ;;
    --dest | --dest=*) flag_value "$@"; dest="${FLAG_VALUE}"; shift "${VALUE_SHIFT}" ;;
    --what | --what=*) flag_value "$@"; what="${FLAG_VALUE}"; shift "${VALUE_SHIFT}" ;;
    --queued) queued=true; shift ;;
    --spot) spot=true; shift ;;
    --detach) detach=true; shift ;;
    -*) die "unknown flag $1; see --help" ;;
    *)
      [[ -z "${command_name}" ]] || die "one command at a time, got '${command_name}' and '$1'"
      command_name="$1"; shift ;;
  esac
done

case "${command_name}" in
  create | install | run | fetch | delete) ;;
  "") die "missing COMMAND (create, install, run, fetch or delete); see --help" ;;
  *) die "unknown COMMAND '${command_name}': use create, install, run, fetch or delete" ;;
esac
if [[ -n "${mode}" ]]; then require_mode "${mode}"; fi
require "${project}" --project SATSYNTH_PROJECT
require "${zone}" --zone SATSYNTH_ZONE
require "${tpu}" --tpu SATSYNTH_TPU
# Every value is checked here, before the first gcloud call. Names go to gcloud (and into
# remote paths such as NAME:satsynth_jax.tar.gz) as they are: strict patterns. Values that
# reach the workers' shell are quoted (quote_args) and must not look like options.
require_pattern "${project}" --project '^([a-z0-9][-a-z0-9.]*:)?[a-z][-a-z0-9]*[a-z0-9]$' \
  "a project ID (lowercase letters, digits and '-', e.g. my-project)"
require_pattern "${zone}" --zone '^[a-z][a-z0-9]*(-[a-z0-9]+)+$' "a zone such as us-central2-b"
require_pattern "${tpu}" --tpu '^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$' \
  "a TPU name (lowercase letters, digits and '-', starting with a letter, at most 63)"
if [[ -n "${accelerator_type}" ]]; then
  require_pattern "${accelerator_type}" --accelerator_type '^[a-z0-9]+(-[a-z0-9]+)*$' \
    "an accelerator type such as v4-32"
fi
if [[ -n "${runtime_version}" ]]; then
  require_pattern "${runtime_version}" --runtime_version '^[A-Za-z0-9][A-Za-z0-9._-]*$' \
    "a runtime version such as tpu-ubuntu2204-base"
fi
require_integer "${wait_minutes}" --wait_minutes 1
if [[ -n "${nfs}" ]]; then
  require_pattern "${nfs}" --nfs '^[^-[:space:][:cntrl:]][^[:space:][:cntrl:]]*:/[^[:cntrl:]]*$' \
    "SERVER:/EXPORT, e.g. 10.0.0.2:/satsynth"
fi
if [[ -n "${config}" ]]; then require_word "${config}" --config; fi
if [[ -n "${workdir}" ]]; then require_word "${workdir}" --workdir; fi
for flag in ${main_flags[@]+"${main_flags[@]}"}; do
  [[ "${flag}" != *[[:cntrl:]]* ]] || die "flags after -- must not contain control characters, got $(shown "${flag}")"
done
[[ "${what}" != *[[:cntrl:]]* ]] || die "--what must not contain control characters, got $(shown "${what}")"
read -r -a what_folders <<<"${what}"
for folder in ${what_folders[@]+"${what_folders[@]}"}; do require_word "${folder}" --what; done
if [[ "${dest}" == -* ]]; then dest="./${dest}"; fi  # a local path, never an option
where=(--project="${project}" --zone="${zone}")

ssh_workers() {  # ssh_workers WORKERS COMMAND: run COMMAND on the workers ("all" or an index)
  gcloud compute tpus tpu-vm ssh "${tpu}" "${where[@]}" --worker="$1" --command="$2"
}

cmd_create() {
  require "${accelerator_type}" --accelerator_type SATSYNTH_ACCELERATOR_TYPE
  require "${runtime_version}" --runtime_version SATSYNTH_RUNTIME_VERSION
  local capacity=()
  if "${spot}"; then capacity=(--spot); fi
  if ! "${queued}"; then
    gcloud compute tpus tpu-vm create "${tpu}" "${where[@]}" --accelerator-type="${accelerator_type}" \
      --version="${runtime_version}" ${capacity[@]+"${capacity[@]}"}
    return
  fi
  gcloud compute tpus queued-resources create "${tpu}" "${where[@]}" --node-id="${tpu}" \
    --accelerator-type="${accelerator_type}" --runtime-version="${runtime_version}" ${capacity[@]+"${capacity[@]}"}
  local deadline=$((SECONDS + 60 * wait_minutes)) state
  while :; do
    state="$(gcloud compute tpus queued-resources describe "${tpu}" "${where[@]}" --format='value(state.state)')"
    echo "queued resource ${tpu}: ${state}"
    case "${state}" in
      ACTIVE) return ;;
      FAILED | SUSPENDED) die "queued resource ${tpu} is ${state}; delete it with: $0 delete --queued" ;;
    esac
    ((SECONDS < deadline)) || die "queued resource ${tpu} not ACTIVE after ${wait_minutes} min (still ${state})"
    sleep 30
  done
}

cmd_install() {
  local archive_dir
  archive_dir="$(mktemp -d)"
  # shellcheck disable=SC2064  # the folder is fixed now; expand it now
  trap "rm -rf $(quote_args "${archive_dir}")" EXIT
  local archive="${archive_dir}/satsynth_jax.tar.gz"
  tar -czf "${archive}" -C "${REPO_ROOT}" --exclude=.git --exclude='.venv*' --exclude='*.egg-info' \
    --exclude=__pycache__ .
  gcloud compute tpus tpu-vm scp "${archive}" "${tpu}:satsynth_jax.tar.gz" "${where[@]}" --worker=all
  local steps=(
    "sudo apt-get update -qq"
    "sudo apt-get install -y -qq python3-venv${nfs:+ nfs-common}"
    # Paths are relative to the home folder, where gcloud's ssh commands start.
    "rm -rf satsynth_jax" "mkdir satsynth_jax" "tar -xzf satsynth_jax.tar.gz -C satsynth_jax"
    "python3 -m venv satsynth_venv" "satsynth_venv/bin/pip install -q --upgrade pip"
    "satsynth_venv/bin/pip install -q 'jax[tpu]' -e './satsynth_jax[gcs]'"  # gcs: records read from gs://
  )
  if [[ -n "${nfs}" ]]; then
    steps+=("sudo mkdir -p /mnt/satsynth"
      "(mountpoint -q /mnt/satsynth || sudo mount -t nfs -o rw,hard $(quote_args "${nfs}") /mnt/satsynth)")
  fi
  local remote="${steps[0]}" step
  for step in "${steps[@]:1}"; do remote+=" && ${step}"; done
  ssh_workers all "${remote}"
}

cmd_run() {
  require "${mode}" --mode
  require "${config}" --config
  require "${workdir}" --workdir
  local workers=all
  if [[ "${mode}" == prepare ]]; then workers=0; fi  # prepare writes the records once
  local job
  job="cd ~/satsynth_jax && ~/satsynth_venv/bin/python -m satsynth_jax.main $(quote_args \
    --distributed=on --mode="${mode}" --config="${config}" --workdir="${workdir}" ${main_flags[@]+"${main_flags[@]}"})"
  if "${detach}"; then  # ${mode} is one of SATSYNTH_MODES (checked above): a plain word
    job="nohup setsid bash -c $(quote_args "${job}") > ~/satsynth_${mode}.log 2>&1 < /dev/null &"
  fi
  ssh_workers "${workers}" "${job}"
  if "${detach}"; then
    echo "started; follow it with: gcloud compute tpus tpu-vm ssh ${tpu} --project=${project} --zone=${zone}" \
      "--worker=0 --command='tail -f ~/satsynth_${mode}.log'"
  fi
}

cmd_fetch() {
  require "${workdir}" --workdir
  require "${dest}" --dest
  ((${#what_folders[@]})) || die "--what names no workdir subfolder"
  # Process 0 (worker 0) writes the logs, PNGs and manifests; pack what exists and copy it back.
  ssh_workers 0 "cd -- $(quote_args "${workdir}") && tar -czf ~/satsynth_results.tar.gz --ignore-failed-read \
-- $(quote_args "${what_folders[@]}")"
  mkdir -p -- "${dest}"
  gcloud compute tpus tpu-vm scp "${tpu}:satsynth_results.tar.gz" "${dest}/" "${where[@]}" --worker=0
  tar -xzf "${dest}/satsynth_results.tar.gz" -C "${dest}" && rm "${dest}/satsynth_results.tar.gz"
  echo "fetched ${what} into ${dest}"
}

cmd_delete() {
  if "${queued}"; then
    gcloud compute tpus queued-resources delete "${tpu}" "${where[@]}" --force --quiet
  else
    gcloud compute tpus tpu-vm delete "${tpu}" "${where[@]}" --quiet
  fi
}

"cmd_${command_name}"
