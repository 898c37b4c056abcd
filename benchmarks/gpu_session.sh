#!/usr/bin/env bash
# The one prepared call for a session lent a GPU (issue 17): the CUDA tests, then benchmarks/bench_gpu.py,
# results under $OUT. Run from the repository root. See /work/notes/gpu.md (or docs) for the device-tool call.
#
#   bash benchmarks/gpu_session.sh                       # on the GPU machine (writes to $OUT)
#   OUT=/tmp/gs bash benchmarks/gpu_session.sh --device cpu --quick   # dry run on a CPU
#
# Budget (H200, ~15 min of device time in all, start-up included): tests ≤ 150 s, benchmarks ≤ 330 s, each
# under its own timeout, so that the call ends in about 8 minutes and leaves time to rerun one part
# (PARTS=grid,trak bash benchmarks/gpu_session.sh --skip-tests). Every file it writes is under $OUT:
#   env.txt (GPU, versions), tests.txt (pytest -rs of the CUDA tests), bench_gpu.md (tables), bench_gpu.log.
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
# carried wheels (traker; see the notes): installed into /tmp/site, never into the image
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
T_TESTS="${T_TESTS:-150}"
T_BENCH="${T_BENCH:-330}"
PARTS="${PARTS:-correctness,fwht,grid,trak,gpt2}"
start=$(date +%s)

{
  date -u
  nvidia-smi 2>&1 | head -15 || true
  "$PY" - <<'EOF'
import importlib, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for m in ("triton", "transformers", "trak", "fast_jl", "pytest"):
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

timeout "$T_BENCH" "$PY" benchmarks/bench_gpu.py --device "$DEVICE" $QUICK --parts "$PARTS" \
  --out "$OUT/bench_gpu.md" 2> "$OUT/bench_gpu.log"
echo "bench: exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/bench_gpu.log"
