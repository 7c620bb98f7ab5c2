#!/usr/bin/env bash
# GPU-side driver: run from the repository root ON THE GPU MACHINE (see benchmarks/gpu/README.md).
#   bash benchmarks/gpu/run.sh prepare                 # assemble staged wheels, check imports, build model dirs
#   bash benchmarks/gpu/run.sh check                   # versions, GPU, sandbox isolation level
#   bash benchmarks/gpu/run.sh python benchmarks/episodes.py --gpu      # any command, with the env set up
# Everything printed is also written to $OUT/<name>.log; scripts write their JSON results to $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 RAY_USAGE_STATS_ENABLED=0
# keep NVLink multicast off (KINDS.md): harmless on one GPU, required on multi-GPU kinds
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export RAYDISTILL_CACHE=${RAYDISTILL_CACHE:-/tmp/raydistill-cache}
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ ! -f /tmp/site/.assembled ]; then
  if [ -f /tmp/store/assemble.sh ]; then bash /tmp/store/assemble.sh; else
    echo "no staged packages in /tmp/store: send the .gpu/c_part* calls first (README.md)" >&2; exit 3; fi
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}

case "${1:-check}" in
  check|prepare)
    $PY - <<'PY' 2>&1 | tee "$OUT/check.log"
import importlib, json, shutil, sys
info = {"python": sys.version.split()[0], "bwrap": shutil.which("bwrap")}
for m in ["torch", "vllm", "transformers", "tokenizers", "pydantic", "pyarrow", "yaml", "numpy", "sympy", "ray",
          "openai", "fastapi", "raydistill"]:
    try:
        mod = importlib.import_module(m)
        info[m] = getattr(mod, "__version__", "ok")
    except Exception as e:
        info[m] = f"MISSING ({type(e).__name__}: {e})"
import torch
info["cuda"] = torch.cuda.is_available() and torch.cuda.get_device_name(0)
try:
    from raydistill.sandbox import Sandbox
    with Sandbox() as sb:
        info["sandbox_isolation"] = sb.isolation_level
        info["sandbox_run"] = sb.run("import numpy, sympy\n6 * 7").value
except Exception as e:
    info["sandbox_isolation"] = f"FAILED: {type(e).__name__}: {e}"
print(json.dumps(info, indent=1))
PY
    if [ "$1" = prepare ]; then
      for s in ${SHAPES:-qwen2.5-0.5b}; do
        $PY benchmarks/gpu/model_shapes.py "$s" "/tmp/raydistill-bench/$s" 2>&1 | tee -a "$OUT/prepare.log"
      done
    fi
    ;;
  *)
    name=$(basename "${2:-$1}" .py)
    set -o pipefail
    "$@" 2>&1 | tee "$OUT/$name.log"
    ;;
esac
