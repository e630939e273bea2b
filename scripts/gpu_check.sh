#!/usr/bin/env bash
# The prepared device check of the GPU path, on one CUDA GPU, in under 8 minutes; one PASS/FAIL line per check,
# a FAIL with its reason (the last line of its log).
#
#   bash scripts/gpu_check.sh                 # results in out/gpu_check/ (logs, bench JSON, BENCHMARKS_gpu.md)
#   OUT=/somewhere PYTHON=python3 bash scripts/gpu_check.sh
#
# Self-contained: it needs only this checkout and the packages of requirements.txt (it installs nothing), no
# network and no shared data (SPARSE_GPT2_DATA points at a folder that does not exist, so nothing falls back on it).
# 1. the test suite's CUDA-marked tests (bf16 GEMMs of the fused loss, a bf16 step vs fp32, the 2:4 kernel)
# 2. bf16 training steps, AST-Boosted (masks + SR-STE + SLoRB + distillation) vs dense, at GPT-2 124M and
#    GPT-2-XL shapes (bench.py train_step_bf16: random weights and tokens; ratios to the dense step of the same run)
# 3. to_sparse_semi_structured 2:4 GEMM vs dense at GPT-2, GPT-2-XL and LLaMA-7B MLP shapes (warm, interleaved)
# 4. its own inputs (scripts/gpu_check_inputs.py: a BPE tokenizer trained on synthetic text, a tiny random GPT-2
#    carrying it, token files from the prepare scripts), then DDP and FSDP single-GPU runs of main.py with resume
# 5. bench.py --markdown turns the JSON into a BENCHMARKS.md section (BENCHMARKS_gpu.md)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
PY=${PYTHON:-python}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export SPARSE_GPT2_DATA="$OUT/no_shared_data"  # never read: every input is made below
failures=0
check() {  # check NAME SECONDS COMMAND...: one line, PASS, or FAIL with its reason and the log to read
    local name=$1 limit=$2 status reason
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    status=$?
    if [ $status -eq 0 ]; then
        echo "PASS $name ($((SECONDS - t0)) s)"
        return
    fi
    if [ $status -eq 124 ]; then
        reason="timed out after $limit s"
    else
        reason=$(grep -v '^[[:space:]]*$' "$OUT/$name.log" | tail -n 1 | cut -c1-200)
    fi
    echo "FAIL $name ($((SECONDS - t0)) s, exit $status): ${reason:-no output}; see $OUT/$name.log"
    failures=$((failures + 1))
}

check gpu_visible 30 "$PY" -c "import torch, sys; print(torch.cuda.get_device_name(0)); sys.exit(not torch.cuda.is_available())"
check cuda_tests 120 "$PY" -m pytest -q -m cuda tests/test_cuda.py
check bf16_step_gpt2 120 "$PY" bench.py --preset gpt2 --device cuda --only train_step_bf16 \
    --variants dense,masks,all --repeats 5 --out "$OUT/bench_gpt2.json"
check bf16_step_gpt2xl 150 "$PY" bench.py --preset gpt2-xl --device cuda --only train_step_bf16 \
    --variants dense,all --repeats 3 --out "$OUT/bench_gpt2xl.json"
check semi_structured_2_4 90 "$PY" bench.py --preset gpt2 --device cuda --only semi_structured --repeats 10 \
    --out "$OUT/bench_semi_structured.json"

# a tokenizer, a tiny random GPT-2 and token files of its own, then the main.py smoke runs on them
check tiny_inputs 120 "$PY" scripts/gpu_check_inputs.py "$OUT"
RUN=()
[ -f "$OUT/run_flags" ] && mapfile -t RUN < "$OUT/run_flags"
RUN+=(--device cuda)
for mode in ddp fsdp; do
    rm -rf "$OUT/run_$mode"
    check "${mode}_first_half" 90 "$PY" -m torch.distributed.run --nproc_per_node=1 main.py "${RUN[@]}" \
        --parallel "$mode" --max_iters 4 --out_dir "$OUT/run_$mode"
    check "${mode}_resume" 90 "$PY" -m torch.distributed.run --nproc_per_node=1 main.py "${RUN[@]}" \
        --parallel "$mode" --max_iters 8 --init_from resume --out_dir "$OUT/run_$mode"
done

check benchmarks_markdown 30 sh -c "$PY bench.py --markdown $OUT/bench_*.json > $OUT/BENCHMARKS_gpu.md"
echo "$failures check(s) failed; logs and JSON in $OUT"
exit $((failures > 0))
