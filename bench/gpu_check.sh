#!/usr/bin/env bash
# GPU readiness check: what lorafleet does on a CUDA machine, in one run, with one JSON summary.
#
#   bash bench/gpu_check.sh [OUT_DIR]        # default OUT_DIR: $OUT if set, else ./gpu-check
#
# It installs nothing: run it in an environment where lorafleet is installed with a CUDA build of torch (and
# triton). Steps (each one runs even when an earlier one failed; the summary says which passed):
#   1. env        torch, CUDA, the GPU, bf16 support, triton's version
#   2. kernels    tests/unit/kernels with TRITON_INTERPRET=0: the Triton activation kernels compiled and run on the GPU
#                 against the torch reference (the other kernel tests run as on CPU)
#   3. fused_full bench/fused_kernels.py --device cuda --dtype bfloat16 (fused vs PEFT, full size)
#   4. fused_1b   the same at a 1B-class size (--size 1b)
#   5. job        the default job with scaling.use_gpu=true and one worker (one GPU), its --json summary and wall time
# Output: OUT_DIR/gpu_check.json (the summary) and one log per step beside it. Exit code 0 when every step passed.
set -u
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
py="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then py=.venv/bin/python; fi

# step NAME TIMEOUT CMD...: runs CMD with its output in OUT/NAME.log; records its exit code and whole seconds in
# OUT/NAME.status.
step() {
  local name=$1 limit=$2
  shift 2
  echo "gpu_check: $name ..." >&2
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$rc $((SECONDS - start))" >"$out/$name.status"
  echo "gpu_check: $name rc=$rc" >&2
}

step env 120 "$py" -c '
import json, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    info.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                bf16=torch.cuda.is_bf16_supported(), memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
print(json.dumps(info))
'
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: torch sees no CUDA device here ($(cat "$out/env.log" | tail -1)); nothing to check" >&2
  exit 2
fi
TRITON_INTERPRET=0 step kernels 900 "$py" -m pytest tests/unit/kernels -q -p no:cacheprovider -o addopts="" -rs
step fused_full 900 "$py" bench/fused_kernels.py --device cuda --dtype bfloat16 --rounds 3 --steps 5 --json
step fused_1b 1500 "$py" bench/fused_kernels.py --device cuda --dtype bfloat16 --size 1b --rounds 3 --steps 3 --json
LORAFLEET_HOME="$out/home" step job 900 "$py" -m lorafleet.cli submit jobs/llama.yaml \
  --set scaling.use_gpu=true --set scaling.num_workers=1 --set training.micro_batch_size=16 --json

"$py" - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])


def last_json(name):
    lines = [l for l in (out / f"{name}.log").read_text(errors="replace").splitlines() if l.startswith("{")]
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None


summary = {}
for name in ("env", "kernels", "fused_full", "fused_1b", "job"):
    status = out / f"{name}.status"
    rc, secs = status.read_text().split() if status.exists() else ("-1", "0")
    entry = {"rc": int(rc), "seconds": int(secs)}
    if name == "kernels":
        tail = [l for l in (out / "kernels.log").read_text(errors="replace").splitlines() if " in " in l]
        entry["result"] = tail[-1].strip("= ") if tail else None
    elif name.startswith("fused"):
        data = last_json(name) or {}
        entry.update({k: data.get(k) for k in ("size", "dtype", "tokens_per_s_ratio", "round_ratios", "peak_mem_ratio",
                                               "mfu", "mfu_peft")})
        entry["tokens_per_s"] = {v: d.get("tokens_per_s") for v, d in data.get("variants", {}).items()}
    else:
        entry["result"] = last_json(name)
    summary[name] = entry
summary["passed"] = all(e["rc"] == 0 for e in summary.values())
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary))
sys.exit(0 if summary["passed"] else 1)
EOF
