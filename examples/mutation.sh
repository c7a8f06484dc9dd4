#!/usr/bin/env bash
# Mutation testing with mutmut (3.x): does the suite fail when a behaviour module's code is changed?
# Outside CI (minutes per small module, hours for all of them). Needs `pip install mutmut`.
#
#   examples/mutation.sh [MODULE ...]       e.g.  examples/mutation.sh augment labels selection/rank
#
# With no MODULE it runs every behaviour module below. Each module runs in its own scratch copy of the working tree
# (tracked and untracked-but-not-ignored files, so nothing is written into the checkout) with a [tool.mutmut]
# section that mutates only that module and runs only its fast tests (`-m "not slow"`). Per module it prints
# killed / survived / other and the score (killed ÷ all mutants), and writes the surviving mutants' diffs to
# $OUT/MODULE.txt (default runs/mutation/): read each one, kill it with a test or name why it is equivalent.
# MUTMUT_CHILDREN sets mutmut's parallel workers (default: the CPU count). MUTATION_TESTS replaces the module's test
# selection (e.g. MUTATION_TESTS=tests/test_train_unit.py: only the fast unit file, a lower bound, far faster).
set -euo pipefail

ROOT=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
OUT=${OUT:-$ROOT/runs/mutation}
PYTHON=${PYTHON:-python}
command -v mutmut >/dev/null || { echo "Error: mutmut is not installed (pip install mutmut)" >&2; exit 2; }

# module → the tests that exercise it (a fast selection; mutmut runs, per mutant, those of them that reach it)
tests_for() {
  case "$1" in
    augment) echo "tests/test_augment_unit.py tests/test_train.py -k augment_or_crop_translates_or_flip_uses" ;;
    labels) echo "tests/test_labels_unit.py tests/test_properties.py tests/test_active.py tests/test_safety.py -k label" ;;
    store) echo "tests/test_store_unit.py tests/test_store_v2.py tests/test_reliability.py" ;;
    # build: not the kill-and-resume tests (processes of their own, up to minutes per surviving mutant on 2 cores);
    # in-process resume tests cover the same code
    build) echo "tests/test_build_unit.py tests/test_build.py -k not_resume_after_kill" ;;
    train) echo "tests/test_train_unit.py tests/test_train.py tests/test_devices.py tests/test_properties.py" ;;
    loader) echo "tests/test_loader_unit.py tests/test_devices.py" ;;
    evaluation) echo "tests/test_evaluation_unit.py tests/test_properties.py" ;;
    selection/*) echo "tests/test_selection_unit.py tests/test_rank_unit.py tests/test_greedy_unit.py tests/test_rank.py tests/test_profiling.py tests/test_properties.py" ;;
    active) echo "tests/test_active_unit.py tests/test_active.py tests/test_properties.py" ;;
    multitask) echo "tests/test_multitask_unit.py tests/test_multitask.py tests/test_export.py" ;;
    export) echo "tests/test_export_unit.py tests/test_export.py" ;;
    backbones/*) echo "tests/test_backbones_unit.py tests/test_backbones.py tests/test_models.py" ;;
    *) echo "Error: no test selection for module '$1'; add it to tests_for in $0" >&2; return 2 ;;
  esac
}

run_module() {
  local module=$1 selection scratch
  selection=${MUTATION_TESTS:-$(tests_for "$module")}
  [ -f "$ROOT/subcache/$module.py" ] || { echo "Error: subcache/$module.py does not exist" >&2; return 2; }
  scratch=$(mktemp -d "${TMPDIR:-/tmp}/subcache-mutation-${module//\//-}.XXXXXX")
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - 2>/dev/null) |
    tar -xf - -C "$scratch"
  # setup.cfg installs cli/ as subcache.cli; the scratch copy is not installed, so it maps it the same way by a link
  [ -e "$scratch/subcache/cli" ] || ln -s ../cli "$scratch/subcache/cli"
  # the selection as a TOML list: "-k EXPR" keeps EXPR as one argument (_or_, _and_ and not_ in it are spaced out)
  local args="" word
  for word in $selection; do word=${word//_or_/ or }; word=${word//_and_/ and }; args+="\"${word//not_/not }\", "; done
  cat >>"$scratch/pyproject.toml" <<EOF

[tool.mutmut]
source_paths = ["subcache"]
only_mutate = ["subcache/$module.py"]
also_copy = ["cli/", "subcache/cli/"]  # mutmut walks subcache/ without following the link
pytest_add_cli_args = ["-p", "no:cacheprovider", "-m", "not slow and not gpu", "-q"]
pytest_add_cli_args_test_selection = [${args%, }]
timeout_constant = 30.0  # seconds: importing torch in each mutant's worker counts against its CPU limit
timeout_multiplier = 4.0  # × the tests' own CPU time (default 15): a mutant that loops forever ends in minutes
EOF
  mkdir "$scratch/mutants"  # before Python starts: a PYTHONPATH folder that does not exist yet is never searched
  echo "== $module: mutating subcache/$module.py, tests: $selection (in $scratch)" >&2
  # pytest's temporary folders (and anything else a test writes to TMPDIR) go with the scratch. mutmut's forked
  # workers end without running pytest's clean-up, so every mutant's folders stay: a sweeper removes those older than
  # 15 minutes (left alone, ~1000 mutants a module filled this machine's 73 GB).
  mkdir "$scratch/tmp"
  (while sleep 60; do find "$scratch/tmp" -mindepth 2 -maxdepth 2 -path "*/pytest-of-*/pytest-*" -mmin +15 \
     -exec rm -rf {} + 2>/dev/null || true; done) &
  local sweeper=$!
  (cd "$scratch" && OMP_NUM_THREADS=1 TMPDIR="$scratch/tmp" PYTHONPATH="$scratch/mutants:$scratch" \
     mutmut run --max-children "${MUTMUT_CHILDREN:-$(nproc)}" >"$scratch/run.log" 2>&1) ||
    { kill $sweeper 2>/dev/null || true; tail -20 "$scratch/run.log" >&2; return 1; }
  kill $sweeper 2>/dev/null || true
  mkdir -p "$OUT"
  (cd "$scratch" && mutmut export-cicd-stats >/dev/null && cp mutants/mutmut-cicd-stats.json "$OUT/${module//\//-}.json" &&
     for m in $(mutmut results | awk -F: '/: survived/ {print $1}'); do mutmut show "$m"; echo; done \
     >"$OUT/${module//\//-}.txt")
  # every mutant's pytest exit code (0 survived, 1 killed, -6 the test process aborted, ...), for the "other" ones
  cp "$scratch/mutants/subcache/$module.py.meta" "$OUT/${module//\//-}.meta.json"
  "$PYTHON" - "$module" "$OUT/${module//\//-}.json" <<'EOF'
import json, sys
module, path = sys.argv[1], sys.argv[2]
s = json.load(open(path))
total = s.get("total") or sum(v for k, v in s.items() if isinstance(v, int) and k != "total")
other = total - s["killed"] - s["survived"]
print(f"{module}: {s['killed']} killed, {s['survived']} survived, {other} other (no tests, timeout, suspicious, "
      f"skipped) of {total}: score {s['killed'] / max(total, 1):.0%}")
EOF
  rm -rf "$scratch"
}

modules=("$@")
[ ${#modules[@]} -gt 0 ] || modules=(store build train loader evaluation selection/rank selection/profile
  selection/halving selection/greedy selection/windows active labels multitask export backbones/core backbones/factory augment)
for module in "${modules[@]}"; do run_module "$module"; done
