#!/usr/bin/env bash
# The GPU benchmark run, in one go on a lent GPU machine (PyTorch there, no Ray, pydantic or structlog, no network):
# installs the carried wheels, makes this checkout importable as l2cluster, then runs three steps, each with its
# own time limit and log, none stopping the others — the GPU tests, bench/pack_cost.py (if present) and
# bench/gpu_sweep.py — and prints a summary last. From the repo root, with .whl/ and .devdata/mnist/ carried:
#
#   bash bench/device/run.sh
#
# Knobs (environment): STEPS (default "tests pack sweep"), T_TESTS / T_PACK / T_SWEEP (seconds per step),
# SWEEP_ARGS / PACK_ARGS (extra arguments; later ones win), MAX_PACK (passed to the daemon as --max-pack),
# DATA (MNIST folder, default .devdata/mnist), PY (default python3), OUT (logs; the device tool sets it),
# WORK (scratch: installed wheels, the shim, the daemon's store; default /tmp/l2c-device).
# Prepare the carried folders on a developer machine, in the checkout that travels:
#   ../shared/tools/slim-ray-wheel.sh && python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 -d .whl pydantic pydantic-core annotated-types \
#     typing-inspection typing-extensions structlog        # (pin the versions of the dev venv)
#   mkdir -p .devdata/mnist && cp ../shared/data/mnist/*.gz .devdata/mnist/
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
OUT=${OUT:-$(mktemp -d)}
WORK=${WORK:-/tmp/l2c-device}
DATA=${DATA:-.devdata/mnist}
STEPS=${STEPS:-tests pack sweep}
T_TESTS=${T_TESTS:-75} T_PACK=${T_PACK:-75} T_SWEEP=${T_SWEEP:-240}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
started=$(date +%s)

# -- set-up: wheels, l2cluster on the path ---------------------------------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  t=$(date +%s)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
    || echo "!! wheel install failed"
  export PYTHONPATH=$WORK/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  echo "wheels installed into $WORK/site in $(( $(date +%s) - t )) s"
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  echo "no .whl/ here: using $PY's own packages"
fi
# pyproject installs the top-level plugins/ as l2cluster.plugins; a checkout on PYTHONPATH needs a link for that
# (the cwd comes first on `python -m`'s path, so a copy elsewhere would be shadowed by this checkout).
made_link=""
if ! "$PY" -c "import l2cluster.plugins" 2>/dev/null && [ ! -e l2cluster/plugins ]; then
  ln -s ../plugins l2cluster/plugins && made_link=1
fi
trap '[ -n "$made_link" ] && rm -f l2cluster/plugins' EXIT
if ! command -v l2cluster >/dev/null; then  # the console script, for anyone typing `l2cluster ...` here
  mkdir -p "$WORK/bin" && printf '#!/bin/sh\nexec %s -m l2cluster.cli "$@"\n' "$PY" >"$WORK/bin/l2cluster"
  chmod +x "$WORK/bin/l2cluster" && export PATH=$WORK/bin:$PATH
fi

{
  nvidia-smi -L 2>&1
  nproc; df -h /dev/shm /tmp 2>&1 | tail -n +2
  "$PY" - <<'PY'
import sys, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "|", gpu)
import l2cluster, l2cluster.plugins, pydantic, ray, structlog
print("ray", ray.__version__, "| pydantic", pydantic.__version__, "| structlog", structlog.__version__,
      "| l2cluster from", l2cluster.__file__, "| plugins from", l2cluster.plugins.__path__[0])
PY
} 2>&1 | tee "$OUT/env.log"
echo "set-up done at $(( $(date +%s) - started )) s"

# -- steps -------------------------------------------------------------------------------------------------------------
summary=()
step() {  # step NAME LIMIT_S COMMAND... : run with a time limit (SIGINT first, so Python cleans up), log to $OUT
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) summary+=("$name: skipped (STEPS)"); return ;; esac
  echo; echo "== $name (limit ${limit} s): $*"
  local t rc; t=$(date +%s)
  timeout -s INT -k 30 "$limit" "$@" >"$OUT/$name.log" 2>&1; rc=$?
  tail -n 25 "$OUT/$name.log"
  local note=""; [ "$rc" = 124 ] || [ "$rc" = 137 ] && note=" (hit its time limit)"
  summary+=("$name: exit $rc in $(( $(date +%s) - t )) s$note")
}

step tests "$T_TESTS" "$PY" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider

if [ -f bench/pack_cost.py ]; then
  # shellcheck disable=SC2086  # PACK_ARGS is a list of words
  step pack "$T_PACK" "$PY" bench/pack_cost.py --device cuda --data-dir "$DATA" ${PACK_ARGS:-}
else
  summary+=("pack: skipped (no bench/pack_cost.py)")
fi

home=$WORK/home
rm -rf "$home"
# The sweep's jobs get at most T_SWEEP - 100 s: daemon start, warm-up, one job and the control take the rest.
# shellcheck disable=SC2086
step sweep "$T_SWEEP" "$PY" bench/gpu_sweep.py --data-dir "$DATA" --device cuda --home "$home" \
  --sweep-timeout-s $(( T_SWEEP > 160 ? T_SWEEP - 100 : T_SWEEP / 2 )) \
  --json "$OUT/gpu_sweep.json" --daemon-log "$OUT/daemon.log" ${MAX_PACK:+--max-pack $MAX_PACK} ${SWEEP_ARGS:-}
# A daemon left behind by a killed run (it runs in its own session, so `timeout` does not reach it).
[ -f "$home/daemon.json" ] && L2CLUSTER_HOME=$home timeout 60 "$PY" -m l2cluster.cli daemon stop
[ -f "$OUT/daemon.log" ] || cp "$home/daemon.log" "$OUT/daemon.log" 2>/dev/null

# -- summary (last, so the tool's output tail holds it) ------------------------------------------------------------
{
  echo; echo "== summary (total $(( $(date +%s) - started )) s) =="
  grep -E "^(GPU [0-9]|python |ray )" "$OUT/env.log"
  printf '%s\n' "${summary[@]}"
  [ -f "$OUT/tests.log" ] && echo "tests: $(tail -n 1 "$OUT/tests.log")"
  [ -f "$OUT/pack.log" ] && { echo "-- pack_cost (tail)"; tail -n 15 "$OUT/pack.log"; }
  [ -f "$OUT/sweep.log" ] && { echo "-- gpu_sweep"; sed -n '/== gpu_sweep summary/,$p' "$OUT/sweep.log"; }
} | tee "$OUT/summary.txt"
