"""Per-module table of a mutmut run (tools/mutation/mutation.sh): killed / survived / timeout / no tests / score.

Reads mutants/<file>.meta as mutmut 3 writes them and counts only the mutants matching the
run's globs (argv), so out-of-scope functions of a mutated file do not dilute the score.
Score = (killed + timeout) / all in-scope mutants: a mutant no selected test reaches counts
against it, like a survivor. `--survivors` also lists the surviving mutant names.
"""

from __future__ import annotations

import fnmatch
import json
import pathlib
import sys

KILLED, TIMEOUT = {1, 3}, {24, -24, 152, 255, 36, -9}  # -9: the CPU limit's follow-up SIGKILL
NO_TESTS, SURVIVED = {5, 33}, {0}


def main(argv: list[str]) -> int:
  show = "--survivors" in argv
  modules = [a for a in argv if a != "--survivors"]  # "name=glob,glob"
  rows, survivors = [], []
  for spec in modules:
    name, globs = spec.split("=", 1)
    globs = globs.split(",")
    counts = dict(killed=0, survived=0, timeout=0, no_tests=0, other=0)
    for meta in sorted(pathlib.Path("mutants").rglob("*.py.meta")):
      for key, code in json.loads(meta.read_text())["exit_code_by_key"].items():
        if not any(fnmatch.fnmatch(key, g) for g in globs):
          continue
        kind = ("killed" if code in KILLED else "timeout" if code in TIMEOUT else "no_tests" if code in NO_TESTS
                else "survived" if code in SURVIVED else "other")  # other: not run, interrupted, crashed
        counts[kind] += 1
        if kind in ("survived", "no_tests", "other"):
          survivors.append(f"{key}  [{kind}, exit {code}]")
    total = sum(counts.values())
    score = (counts["killed"] + counts["timeout"]) / total if total else float("nan")
    rows.append((name, total, counts, score))
  print(f"{'module':<14}{'mutants':>8}{'killed':>8}{'survived':>9}{'timeout':>8}{'no tests':>9}{'other':>6}"
        f"{'score':>8}")
  for name, total, c, score in rows:
    print(f"{name:<14}{total:>8}{c['killed']:>8}{c['survived']:>9}{c['timeout']:>8}{c['no_tests']:>9}"
          f"{c['other']:>6}{score:>8.1%}")
  if show and survivors:
    print("\nnot killed (inspect with: .venv/bin/mutmut show NAME):")
    print("\n".join(f"  {s}" for s in survivors))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
