# Shared by the launch scripts (sourced, not run): errors, required settings, quoting.
# shellcheck shell=bash

# The repository root: the launch scripts run `python -m satsynth_jax.main` from here.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export REPO_ROOT

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

# require VALUE FLAG [ENV]: stop with a message naming the setting when VALUE is empty.
require() {
  local value="$1" flag="$2" env="${3:-}"
  if [[ -z "${value}" ]]; then
    if [[ -n "${env}" ]]; then
      die "missing setting ${flag} (or environment variable ${env}); see --help"
    fi
    die "missing setting ${flag}; see --help"
  fi
}

# require_integer VALUE FLAG MIN: VALUE must be an integer >= MIN.
require_integer() {
  local value="$1" flag="$2" min="$3"
  if ! [[ "${value}" =~ ^[0-9]+$ ]] || ((value < min)); then
    die "${flag} must be an integer >= ${min}, got '${value}'"
  fi
}

# The value of a --flag=value or --flag value pair; the caller shifts by VALUE_SHIFT.
# Usage: flag_value "$@"; name="${FLAG_VALUE}"; shift "${VALUE_SHIFT}"
# shellcheck disable=SC2034  # FLAG_VALUE and VALUE_SHIFT are read by the sourcing script
flag_value() {
  if [[ "$1" == *=* ]]; then
    FLAG_VALUE="${1#*=}"
    VALUE_SHIFT=1
  elif (($# >= 2)); then
    FLAG_VALUE="$2"
    VALUE_SHIFT=2
  else
    die "$1 needs a value"
  fi
}

# Every argument quoted for a remote bash shell, joined by spaces.
quote_args() {
  local out="" arg
  for arg in "$@"; do
    out+="$(printf '%q' "${arg}") "
  done
  printf '%s' "${out% }"
}
