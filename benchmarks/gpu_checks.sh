#!/usr/bin/env bash
# The GPU checks recorded in benchmarks/README.md, as one command on a lent GPU machine (the `device` tool runs it
# from the repository root with $OUT set). TransformerLens, SAELens, MLflow and what they need beyond that machine's
# own torch and transformers travel as wheels in .whl/ (its README says how to fetch them); their versions are
# printed first and recorded in every JSON. `bash benchmarks/gpu_checks.sh [fork] [step_server] [train_sae] [sweep] [memo]
# [core] [twins] [suites]`. `twins` reads a built tiny world from .gpuworld/ (carried: copy a world step's artifact
# there); `suites` reads .gpuworlds/tiny/ and .gpuworlds/tiny-gemma2/ (the worlds of those experiment files) and
# compares with the CPU run recorded in benchmarks/results/evaluate_suites_tiny_cpu.json.
set -u -o pipefail
OUT=${OUT:-/tmp/saecomp-gpu}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1  # appended: several calls in one device command share one log
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
# datasets 3.6.0's torch formatter imports torchvision.io.VideoReader, which that machine's torchvision 0.26 lacks, and
# SAELens's activation store then fails; saecomp's environment never installs torchvision (../shared/GUIDE.md)
python3 -m pip uninstall -y -q torchvision 2>/dev/null
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
# The card in the results' names: h100, h200, ...
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o -i -E "[a-z][0-9]{3}" | head -1 | tr 'A-Z' 'a-z')
CARD=${CARD:-gpu}
python3 -c "
import sys
from importlib.metadata import PackageNotFoundError, version
def v(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return 'not installed'
print('Python', sys.version.split()[0], *(f'{n} {v(n)}' for n in ('torch', 'transformers', 'transformer-lens', 'sae-lens', 'sae-bench', 'datasets', 'mlflow-skinny')))"
PARTS=${*:-fork step_server train_sae sweep memo core twins suites}  # which checks: all by default
part() { [[ " $PARTS " == *" $1 "* ]]; }

part suites && echo "== every evaluate suite on the GPU, the tiny world's tiny-gpt2 and tiny-gemma2 with a random TopK SAE, against the CPU's numbers" &&
timeout 240 python3 benchmarks/evaluate_suites.py --worlds .gpuworlds --device cuda --no-cpu \
  $([ -f benchmarks/results/evaluate_suites_tiny_cpu.json ] && echo --reference benchmarks/results/evaluate_suites_tiny_cpu.json) --library-log "$OUT/evaluate_suites_library_log.txt" \
  --json "$OUT/evaluate_suites_tiny_${CARD}.json" 2>&1 | grep -v -i warn

part fork && echo "== CUDA across fork (why the step server asks through NVML)" &&
timeout 120 python3 benchmarks/cuda_fork_check.py --json "$OUT/cuda_fork_check_${CARD}.json"

part step_server && echo "== the step server's tests, a forked step's CUDA included" &&
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_step_server.py 2>&1 | tail -25

part train_sae && echo "== train_sae against SAELens's runner alone" &&
timeout 240 python3 benchmarks/train_sae.py --shape gpt2-small --device cuda --tokens 1000000 --batch-size-tokens 4096 \
  --expansion 32 --repeats 3 --asynchronous-too --json "$OUT/train_sae_gpt2-small_${CARD}.json" 2>&1 | grep -v -e "Training SAE" -e "warn"

part sweep && echo "== the SAE sweep over its floor at GPT-2 small's middle and last layers and Gemma-2-2B's last" &&
timeout 100 python3 benchmarks/sae_sweep.py --shape gpt2-small --device cuda --sequences 32 --seq-len 1024 --repeats 3 \
  --layers 6,11 --no-baselines --json "$OUT/sae_sweep_gpt2-small_${CARD}_layers6-11.json" 2>&1 | tail -6
part sweep &&
timeout 100 python3 benchmarks/sae_sweep.py --shape gemma-2-2b --device cuda --dtype bfloat16 --sequences 8 --seq-len 1024 \
  --repeats 3 --layers 25 --no-baselines --json "$OUT/sae_sweep_gemma-2-2b_${CARD}_layer25.json" 2>&1 | tail -5

part memo && echo "== SCR's ablation loop with and without the SAE memo, at GPT-2 small's and Gemma-2-2B's SAE shapes" &&
for shape in gpt2-small gemma-2-2b; do
  timeout 240 python3 benchmarks/sae_memo.py --device cuda --shape $shape --json "$OUT/sae_memo_${shape}_${CARD}.json" 2>&1 | tail -8
done

part twins && echo "== SCR's and TPP's padding-masked twins on the GPU, the tiny world's model in fp32 and bf16" &&
for dtype in float32 bfloat16; do
  timeout 180 python3 benchmarks/evaluate_scr_tpp.py --world .gpuworld --device cuda --dtype $dtype --repeats $([ $dtype = float32 ] && echo 2 || echo 1) \
    --json "$OUT/evaluate_scr_tpp_twins_tiny_${dtype}_${CARD}.json" 2>&1 | tee -a "$OUT/full_log.txt" | grep -E "^(scr|tpp):|Error|Traceback"
done

part core && echo "== evaluate's core (run_core) against SAEBench's run_evals alone, GPT-2 small fp32 and Gemma-2-2B bf16" &&
for case in "gpt2-small float32" "gemma-2-2b bfloat16"; do
  set -- $case
  timeout 100 python3 benchmarks/evaluate_core.py --shape $1 --device cuda --dtype $2 --repeats 3 \
    --json "$OUT/evaluate_core_${1}_${CARD}.json" 2>&1 | tee -a "$OUT/full_log.txt" | grep -E "^(shape|SAEBench|saecomp|ratio|metrics)|Error|Traceback"
done
