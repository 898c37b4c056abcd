#!/usr/bin/env bash
# The prepared calls for a session lent a GPU: issue 17's CUDA tests and benchmarks/bench_gpu.py, and (part
# `lds`) issue 16's same-run LDS table of benchmarks/bench_lds_cnn.py on the device. Results under $OUT.
# Run from the repository root.
#
#   bash benchmarks/gpu_session.sh                       # on the GPU machine: tests + bench_gpu (writes to $OUT)
#   PARTS=lds bash benchmarks/gpu_session.sh --skip-tests   # on the GPU machine: the LDS table alone
#   OUT=/tmp/gs bash benchmarks/gpu_session.sh --device cpu --quick   # dry run on a CPU
#   OUT=/tmp/gs PARTS=lds bash benchmarks/gpu_session.sh --device cpu --skip-tests --quick   # dry run of lds
#
# Budget (H200, ~15 min of device time in all, start-up included; one command ≤ 600 s): tests ≤ 150 s,
# benchmarks ≤ 330 s, each under its own timeout, so that the default call ends in about 8 minutes and leaves
# time to rerun one part (PARTS=grid,trak bash benchmarks/gpu_session.sh --skip-tests). Every file it writes is
# under $OUT: env.txt (GPU, versions), tests.txt (pytest -rs of the CUDA tests), bench_gpu.md (tables),
# bench_gpu.log.
#
# Part `lds` (issue 16's time goal; not in the default PARTS, since tests + bench + lds would pass the 600 s one
# command may run: it is its own call, under T_LDS = 200 s). First, on the CPU machine, in the checkout the device
# tool sends: `bash benchmarks/gpu_prep.sh`, which writes the git-ignored .gpu/lds_cnn (the CPU run's model and
# ground truth, the selected images) and .whl (peer wheels), about 4 MiB. Then the device call names both:
#   run(command="PARTS=lds bash benchmarks/gpu_session.sh --skip-tests", carry=[".gpu", ".whl"], timeout_s=300)
# It runs every gradsketch method and peer of bench_lds_cnn.py on the device, the decisive rows first (FIRST
# below), each timed in synchronised wall seconds after a full-size warm-up, torch.manual_seed(0) before each
# timed run; the methods stop at T_LDS - 30 s and the report covers what finished. Files under $OUT: env.txt,
# lds_cnn_gpu.md (the table, each row against the best peer, and issue 16's goal-2 bar), lds_cnn_gpu.log,
# lds_methods.json. LDS_ONLY (label substrings separated by '|') restricts the methods; with --quick, five rows
# that exercise each peer's wheel.
set -u -o pipefail
DEVICE=cuda
QUICK=""
SKIP_TESTS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK="--quick"; shift ;;
    --skip-tests) SKIP_TESTS=1; shift ;;
    *) echo "gpu_session.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-$PWD/gpu-session-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
# carried wheels (benchmarks/gpu_prep.sh: the peers traker, kronfluence, einconv, dattri): installed into
# /tmp/site, never into the image; a wheel of .whl/fallback/ only where the image does not import that module
if ls .whl/*.whl >/dev/null 2>&1; then
  wheels=(.whl/*.whl)
  for mod in accelerate einops opt_einsum safetensors; do
    if ! "$PY" -c "import $mod" >/dev/null 2>&1; then
      for w in .whl/fallback/"$mod"-*.whl; do [ -f "$w" ] && wheels+=("$w"); done
    fi
  done
  SITE="${SITE:-/tmp/site}"   # another folder for a dry run on a shared machine
  echo "installing into $SITE: ${wheels[*]}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
    && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
T_TESTS="${T_TESTS:-150}"
T_BENCH="${T_BENCH:-330}"
T_LDS="${T_LDS:-200}"
PARTS="${PARTS:-correctness,fwht,grid,trak,gpt2}"
RUN_LDS=0
case ",$PARTS," in *,lds,*) RUN_LDS=1 ;; esac
BENCH_PARTS=$(echo "$PARTS" | tr ',' '\n' | grep -vx lds | paste -sd, - || true)
start=$(date +%s)

{
  date -u
  nvidia-smi 2>&1 | head -15 || true
  "$PY" - <<'EOF'
import importlib, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for m in ("triton", "transformers", "trak", "fast_jl", "pytest", "kronfluence", "dattri", "accelerate", "einops",
          "einconv", "opt_einsum", "safetensors"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(m, "not importable:", type(e).__name__, str(e)[:100])
from gradsketch.sketch import _native
print("native CPU kernels:", _native.status())
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$SKIP_TESTS" = 0 ]; then
  # every test that needs CUDA (the names say cuda or gpu), plus the interpreter check of the kernels
  timeout "$T_TESTS" "$PY" -m pytest -q -rs -p no:cacheprovider -o addopts="" -m "not slow" \
    tests/test_sketch_triton.py tests/test_sketch.py tests/test_linalg_common.py tests/test_optim.py \
    tests/test_linalg_frequent_directions.py \
    -k "cuda or gpu or interpreter" 2>&1 | tee "$OUT/tests.txt"
  echo "tests: exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s" | tee -a "$OUT/tests.txt"
fi

if [ "$RUN_LDS" = 1 ]; then
  # issue 16 on the device: a fresh copy of the CPU run's model and ground truth (so nothing cached is reused),
  # the methods under T_LDS less 30 s, then the report of whatever finished (methods.json is written per method)
  LDS_WORK="${LDS_WORK:-/tmp/gs-lds-cnn}"
  LOG="$OUT/lds_cnn_gpu.log"
  if [ ! -f .gpu/lds_cnn/full_model.pt ]; then
    echo "lds: .gpu/lds_cnn/ missing: run bash benchmarks/gpu_prep.sh on the CPU machine and carry .gpu and .whl" \
      | tee "$LOG"
  else
    rm -rf "$LDS_WORK" && mkdir -p "$LDS_WORK" && cp -r .gpu/lds_cnn/. "$LDS_WORK"/
    # the decisive rows first (issue 16's goal 2: the best peer, TRAK's three kernels, EK-FAC), so that a run cut
    # short by its timeout still answers; the unsketched ones before the affd rows, which run the Triton kernels
    # for the first time on a GPU: a kernel fault can leave the CUDA context unusable for every later row
    FIRST=("kronfluence EK-FAC" "TRAK (unsketched, default kernel='auto': ggn_trace)"
           "TRAK, kernel='features' (unsketched; published, the default before session 11)"
           "TRAK, kernel='ggn' (unsketched)" "EK-FAC" "TRAK, affd d=2048 (default kernel: ggn_trace)"
           "TRAK, affd d=4096 (default kernel: ggn_trace)" "TRAK, kernel='ggn', affd d=4096"
           "TRAK, kernel='ggn', affd d=2048" "TRAK, kernel='features', affd d=2048"
           "TRAK, kernel='ggn', ggn_rank=2, affd d=2048")
    ONLY=()
    if [ -n "${LDS_ONLY:-}" ]; then
      IFS='|' read -r -a ONLY <<< "$LDS_ONLY"
    elif [ -n "$QUICK" ]; then
      ONLY=("kronfluence EK-FAC" "TRAK (unsketched" "TRAK, affd d=2048" "traker TRAK" "dattri TRAK")
    fi
    lds_args=(--device "$DEVICE" --cache "$LDS_WORK" --data "$LDS_WORK/fashion.npz" --seed 0 --first "${FIRST[@]}")
    [ ${#ONLY[@]} -gt 0 ] && lds_args+=(--only "${ONLY[@]}")
    timeout "$(( T_LDS - 30 ))" "$PY" benchmarks/bench_lds_cnn.py methods "${lds_args[@]}" > "$LOG" 2>&1
    echo "lds methods: exit $? after $(( $(date +%s) - start )) s" | tee -a "$LOG"
    timeout 30 "$PY" benchmarks/bench_lds_cnn.py report --device "$DEVICE" --cache "$LDS_WORK" \
      --data "$LDS_WORK/fashion.npz" --out "$OUT/lds_cnn_gpu.md" >> "$LOG" 2>&1
    echo "lds report: exit $? after $(( $(date +%s) - start )) s" | tee -a "$LOG"
    cp "$LDS_WORK/methods.json" "$OUT/lds_methods.json" 2>/dev/null || true
    cat "$OUT/lds_cnn_gpu.md" 2>/dev/null || tail -40 "$LOG"
  fi
fi

if [ -n "$BENCH_PARTS" ]; then
  timeout "$T_BENCH" "$PY" benchmarks/bench_gpu.py --device "$DEVICE" $QUICK --parts "$BENCH_PARTS" \
    --out "$OUT/bench_gpu.md" 2> "$OUT/bench_gpu.log"
  echo "bench: exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/bench_gpu.log"
fi
