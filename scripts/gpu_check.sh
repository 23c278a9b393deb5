#!/usr/bin/env bash
# The CUDA check, on a bare GPU machine that reaches no package registry:
#   scripts/gpu_check.sh OUTDIR
# 1. installs the missing dependencies from the wheels in .whl/ and the package itself with
#    `pip install --no-deps` into a target folder, over the torch the machine has;
# 2. runs the gpu-marked tests (`make test-gpu`'s selection; no Redis needed);
# 3. runs `tolaria bench --device cuda --json OUTDIR/bench_cuda.json`.
# Logs go to OUTDIR (gpu_check.log says what ran, its exit status and its time; one log per step).
# Each step has a time limit, so the whole check ends in well under 10 minutes.
#
#   scripts/gpu_check.sh --fetch-wheels   downloads the wheels into .whl/ (on a machine with pip access)
#
# Environment: PYTHON (python3), GPU_CHECK_WHEELS (.whl), GPU_CHECK_SITE (/tmp/site), and
# GPU_CHECK_ALLOW_CPU=1 to run the CPU half where torch sees no CUDA (the CUDA steps are skipped,
# each with a line saying so). Exit status: 0 when every step that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."

# Python 3.12 wheels of what the GPU machine lacks (pydantic, redis-py, crc32c, and a protobuf
# new enough for the generated Leyline code), with pydantic's own needs.
WHEELS_WANTED=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
               typing-extensions==4.16.0 redis==8.1.0 crc32c==2.9.post0 protobuf==7.36.2)
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/site}
TESTS_LIMIT_S=${GPU_CHECK_TESTS_LIMIT_S:-300}
BENCH_LIMIT_S=${GPU_CHECK_BENCH_LIMIT_S:-240}

if [[ ${1:-} == --fetch-wheels ]]; then
  mkdir -p "$WHEELS"
  exec "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" "${WHEELS_WANTED[@]}"
fi
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR  (or --fetch-wheels)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
: >"$LOG"
failed=0

say() { echo "gpu_check: $*" | tee -a "$LOG"; }

# step NAME LIMIT_S CMD...: runs CMD with its output in OUTDIR/NAME.log, records status and time.
step() {
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  say "$name: $*"
  # through bash -c: a step may be one of the functions below (exported), `timeout` runs programs only
  timeout --signal=TERM --kill-after=15 "$limit" bash -c '"$@"' "$name" "$@" >>"$OUT/$name.log" 2>&1
  local rc=$?
  if ((rc == 0)); then
    say "$name: ok in $((SECONDS - started)) s"
  else
    ((rc == 124)) && say "$name: ran past its ${limit} s limit"
    say "$name: FAILED (exit $rc) in $((SECONDS - started)) s; see $name.log"
    failed=1
  fi
  return $rc
}

install_wheels() {
  shopt -s nullglob
  local wheels=("$WHEELS"/*.whl)
  shopt -u nullglob
  if ((${#wheels[@]} == 0)); then
    echo "no wheels in $WHEELS: run scripts/gpu_check.sh --fetch-wheels where pip reaches a registry"
    return 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
}

install_package() {
  # Built from a copy: the build's scratch files stay out of the checkout.
  local src
  src=$(mktemp -d -t gpu-check-src-XXXXXX)
  cp -r pyproject.toml README.md src "$src"/
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" "$src"
  local rc=$?
  rm -rf "$src"
  return $rc
}

describe() {
  "$PY" - <<'EOF'
import os, sys
import esper, pydantic, redis, crc32c, google.protobuf, torch
print("esper from", esper.__file__)
site = os.path.realpath(os.environ["SITE"])
if not os.path.realpath(esper.__file__).startswith(site + os.sep):
    sys.exit(f"esper is imported from {esper.__file__}, not from the install in {site}")
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
print("pydantic", pydantic.VERSION, "redis", redis.__version__, "protobuf", google.protobuf.__version__)
EOF
}

export -f install_wheels install_package describe
export PY WHEELS SITE
say "started $(date -u +%FT%TZ) in $(pwd); python: $("$PY" --version 2>&1)"
cuda=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>>"$LOG")
if [[ $cuda != 1 && ${GPU_CHECK_ALLOW_CPU:-0} != 1 ]]; then
  say "torch sees no CUDA device here: this check needs a GPU (GPU_CHECK_ALLOW_CPU=1 runs its CPU half)"
  exit 2
fi

step install 120 install_wheels && step install 180 install_package
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"
step install 60 describe

if [[ $cuda == 1 ]]; then
  command -v nvidia-smi >/dev/null && nvidia-smi -L >>"$LOG" 2>&1
  step gpu_tests "$TESTS_LIMIT_S" "$PY" -m pytest -q -rs -m gpu -p no:randomly -p no:cacheprovider \
    --continue-on-collection-errors tests
  step bench "$BENCH_LIMIT_S" "$PY" -m esper.tolaria bench --device cuda --json "$OUT/bench_cuda.json"
else
  say "skipped (no CUDA): the gpu tests (make test-gpu) and tolaria bench --device cuda"
fi
say "finished $(date -u +%FT%TZ) after ${SECONDS} s: $([[ $failed == 0 ]] && echo passed || echo FAILED)"
exit $failed
