#!/usr/bin/env bash
# Mutation testing of the modules whose bugs would silently corrupt results (mutmut 3, CPU).
#
#   tools/mutation/mutation.sh                    # every module below
#   tools/mutation/mutation.sh labels curation    # a subset (keys: labels schedule sampling segmentation fid pipeline curation)
#
# Needs `pip install -e .[test,mutation]`. Configuration: the [mutmut] section of setup.cfg.
# mutmut works in a copy (mutants/, git-ignored, rebuilt on every run); the source tree is not
# touched. Prints killed / survived / timeout / no tests / score per module and the names of the
# mutants not killed (`.venv/bin/mutmut show NAME` prints a mutant's diff). Reviewed equivalent
# mutants: tools/mutation/mutation_equivalent.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

MUTMUT=${MUTMUT:-.venv/bin/mutmut}
PYTHON=${PYTHON:-.venv/bin/python}

# Mutant-name globs per module. pipeline.py: only the resize/augment/mix functions (the rest is I/O);
# metrics/curation.py: the filter/selection functions, not the loops over scored batches. metrics/segmentation.py's
# confusion_matrix carries @jax.jit, and mutmut leaves decorated functions alone.
declare -A GLOBS=(
  [labels]="satsynth_jax.labels.*"
  [schedule]="satsynth_jax.diffusion.schedule.*"
  [sampling]="satsynth_jax.diffusion.sampling.*"
  [segmentation]="satsynth_jax.metrics.segmentation.*"
  [fid]="satsynth_jax.metrics.fid.*"
  [pipeline]="$(printf 'satsynth_jax.data.pipeline.%s*,' x__fit x__dihedral x__train_view x__eval_view x_mix \
               x__endless x__tag | sed 's/,$//')"
  [curation]="$(printf 'satsynth_jax.metrics.curation.%s*,' x_pixel_losses x_class_ x_keep_mask x_label_fidelity \
               x_resize_nearest x_filtered_mask x_pair_scores x_select | sed 's/,$//')"
)
ORDER=(labels schedule sampling segmentation fid pipeline curation)
modules=("$@")
[[ ${#modules[@]} -gt 0 ]] || modules=("${ORDER[@]}")

names=() specs=()
for m in "${modules[@]}"; do
  [[ -n ${GLOBS[$m]:-} ]] || { echo "unknown module '$m'; expected one of: ${ORDER[*]}" >&2; exit 2; }
  IFS=, read -ra g <<< "${GLOBS[$m]}"
  names+=("${g[@]}")
  specs+=("$m=${GLOBS[$m]}")
done

# The test conftest sets these too, but mutmut's fork server imports JAX before any conftest runs.
export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=1" OPENBLAS_NUM_THREADS=1
# Every mutant is a fresh process that compiles the same small programs again: cache them all
# (a mutant only adds entries for the programs it changes), apart from the test suite's cache.
export JAX_COMPILATION_CACHE_DIR=${MUTATION_XLA_CACHE:-/tmp/satsynth_jax_mutation_xla_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0

# mutmut records the git HEAD for its result cache; we rebuild mutants/ every run, so hand it a
# git that answers nothing (it then hashes files instead) and keep the run off the repository.
shim=$(mktemp -d)
trap 'rm -rf "$shim"' EXIT
printf '#!/bin/sh\nexit 1\n' > "$shim/git" && chmod +x "$shim/git"

rm -rf mutants
start=$(date +%s)
rc=0
PATH="$shim:$PATH" "$MUTMUT" run "${names[@]}" > "$shim/log" 2>&1 || rc=$?
mkdir -p mutants && tr '\r' '\n' < "$shim/log" > mutants/mutation.log
times > "$shim/times"  # not inside $(...): a subshell would report its own (zero) children
cpu=$(tail -n 1 "$shim/times" | awk '{print $1" user + "$2" sys"}')
echo "wall time: $(( $(date +%s) - start )) s; CPU time: $cpu; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
if [[ $rc -ne 0 ]]; then
  tail -n 40 mutants/mutation.log >&2
  echo "mutmut failed (exit $rc); full log: mutants/mutation.log" >&2
  exit "$rc"
fi
grep -E 'mutations/second' mutants/mutation.log || true
"$PYTHON" tools/mutation/mutation_report.py --survivors "${specs[@]}"
