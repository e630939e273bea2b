#!/usr/bin/env bash
# The prepared device check of the GPU path, on one CUDA GPU, in under 8 minutes; one PASS/FAIL line per check.
#
#   bash scripts/gpu_check.sh                 # results in out/gpu_check/ (logs, bench JSON, BENCHMARKS_gpu.md)
#   OUT=/somewhere PYTHON=python3 bash scripts/gpu_check.sh
#
# 1. the test suite's CUDA-marked tests (bf16 GEMMs of the fused loss, a bf16 step vs fp32, the 2:4 kernel)
# 2. bf16 training steps, AST-Boosted (masks + SR-STE + SLoRB + distillation) vs dense, at GPT-2 124M and
#    GPT-2-XL shapes (bench.py train_step_bf16: ratios to the dense step measured in the same run)
# 3. to_sparse_semi_structured 2:4 GEMM vs dense at GPT-2, GPT-2-XL and LLaMA-7B MLP shapes (warm, interleaved)
# 4. DDP and FSDP single-GPU smoke runs of main.py with resume (tiny random GPT-2, the shared data)
# 5. bench.py --markdown turns the JSON into a BENCHMARKS.md section (BENCHMARKS_gpu.md)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
PY=${PYTHON:-python}
mkdir -p "$OUT"
failures=0
check() {  # check NAME SECONDS COMMAND...: one line, PASS or FAIL with the log to read
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
        echo "PASS $name ($((SECONDS - t0)) s)"
    else
        echo "FAIL $name ($((SECONDS - t0)) s, exit $?): see $OUT/$name.log"
        failures=$((failures + 1))
    fi
}

check gpu_visible 30 "$PY" -c "import torch, sys; print(torch.cuda.get_device_name(0)); sys.exit(not torch.cuda.is_available())"
check cuda_tests 120 "$PY" -m pytest -q -m cuda tests/test_cuda.py
check bf16_step_gpt2 120 "$PY" bench.py --preset gpt2 --device cuda --only train_step_bf16 \
    --variants dense,masks,all --repeats 5 --out "$OUT/bench_gpt2.json"
check bf16_step_gpt2xl 150 "$PY" bench.py --preset gpt2-xl --device cuda --only train_step_bf16 \
    --variants dense,all --repeats 3 --out "$OUT/bench_gpt2xl.json"
check semi_structured_2_4 90 "$PY" bench.py --preset gpt2 --device cuda --only semi_structured --repeats 10 \
    --out "$OUT/bench_semi_structured.json"

# a tiny random GPT-2 folder and token files for the main.py smoke runs
check tiny_inputs 60 "$PY" - "$OUT" <<'EOF'
import os, subprocess, sys
import torch
from transformers import GPT2Config, GPT2LMHeadModel
out = sys.argv[1]
torch.manual_seed(0)
GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128)).save_pretrained(f"{out}/tiny_gpt2")
data = os.environ.get("SPARSE_GPT2_DATA", "../shared/data")
subprocess.run([sys.executable, "data/c4_dataset/prepare.py", "--input",
                f"{data}/c4/en/c4-train.00000-of-01024.head1000.json.gz", "--val_files",
                f"{data}/c4/en/c4-validation.00000-of-00008.head1000.json.gz", "--max_docs", "200",
                "--out_dir", f"{out}/c4", "--force"], check=True)
subprocess.run([sys.executable, "data/wikitext/prepare.py", "--input", f"{data}/wikitext2", "--out_dir",
                f"{out}/wikitext", "--force"], check=True)
EOF
RUN=(--config cpu_tiny --device cuda --student_model "$OUT/tiny_gpt2" --teacher_model "$OUT/tiny_gpt2"
     --data_dir "$OUT/c4" --wikitext_dir "$OUT/wikitext" --distill_model True --SLoRB True --srste_decay 1e-3
     --block_size 128 --num_threads 0)
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
