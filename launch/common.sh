# Shared by the launch scripts (sourced, not run): the modes, errors, required settings,
# validation and quoting.
# shellcheck shell=bash
#
# Rule for every script here: a value that reaches a shell (a remote one through
# `gcloud ... ssh --command`, or a remote path) is either checked against a known set (modes)
# or a strict pattern (names, zones, folder names), or quoted with quote_args (printf %q), so
# that the remote bash sees it as one literal word. Checks run before any command is issued.

# The repository root: the launch scripts run `python -m satsynth_jax.main` from here.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export REPO_ROOT

# The modes of `python -m satsynth_jax.main --mode=...`: the one list every launch script uses.
# It must equal the keys of satsynth_jax.main.MODES (tests/test_launch.py checks it).
SATSYNTH_MODES=(prepare train_diffusion train_sr sample curate train_metric_encoder evaluate_samples
  train_segmentation evaluate experiment export)
readonly SATSYNTH_MODES

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

# VALUE for an error message: in single quotes, or as printf %q writes it when it holds
# control characters (so that the message stays one line).
shown() {
  if [[ "$1" == *[[:cntrl:]]* ]]; then
    printf '%q' "$1"
  else
    printf "'%s'" "$1"
  fi
}

# require_mode VALUE: VALUE must be one of SATSYNTH_MODES.
require_mode() {
  local known
  for known in "${SATSYNTH_MODES[@]}"; do
    [[ "$1" != "${known}" ]] || return 0
  done
  die "unknown --mode $(shown "$1"); use one of: ${SATSYNTH_MODES[*]}"
}

# require_pattern VALUE FLAG REGEX WHAT: VALUE must match the (bash) REGEX; WHAT describes it.
require_pattern() {
  local value="$1" flag="$2" regex="$3" what="$4"
  [[ "${value}" =~ ${regex} ]] || die "${flag} must be ${what}, got $(shown "${value}")"
}

# require_word VALUE FLAG: VALUE goes to a remote shell (quoted): it must not start with '-'
# (it would be read as an option) nor hold control characters (newlines, escapes).
require_word() {
  local value="$1" flag="$2"
  if [[ "${value}" == -* || "${value}" == *[[:cntrl:]]* ]]; then
    die "${flag} must not start with '-' nor contain control characters, got $(shown "${value}")"
  fi
}

# The modes as the indented lines of a help text.
modes_help() {
  local line="  " mode
  for mode in "${SATSYNTH_MODES[@]}"; do
    if ((${#line} + ${#mode} > 88)); then
      echo "${line% }"
      line="  "
    fi
    line+="${mode} "
  done
  echo "${line% }"
}

# require_integer VALUE FLAG MIN: VALUE must be an integer >= MIN.
require_integer() {
  local value="$1" flag="$2" min="$3"
  if ! [[ "${value}" =~ ^[0-9]+$ ]] || ((value < min)); then
    die "${flag} must be an integer >= ${min}, got $(shown "${value}")"
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

# Every argument quoted for a remote bash shell (printf %q), joined by spaces: the remote
# shell sees each one as a single literal word, whatever characters it holds.
quote_args() {
  local out="" arg
  for arg in "$@"; do
    out+="$(printf '%q' "${arg}") "
  done
  printf '%s' "${out% }"
}
