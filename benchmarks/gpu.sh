#!/usr/bin/env bash
# The benchmark on a GPU machine with no network, in one go (under 10 minutes on an H100):
#   here:  benchmarks/.venv/bin/python benchmarks/gpu_prepare.py .gpu      (data + tokenizer)
#          pip download the wheels below into .whl/                         (see benchmarks/README.md)
#   there: OUT=results-dir bash benchmarks/gpu.sh
# A 1.17B-parameter model with SmolLM2's vocabulary and random weights is built there
# (benchmarks/random_model.py): no 0.5-1.5B checkpoint can be had offline.
# Knobs for a dry run on a CPU: PY, SHAPE=tiny, SKIP_INSTALL=1, STEPS, WARMUP; TIMEOUT (s per workload).
# ONLY and LEVERS (space-separated workload names) run a part: LEVERS=" " runs no lever.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
if [ -z "${SKIP_INSTALL:-}" ]; then
  # trl, datasets (+dill, multiprocess) are missing there; transformers/peft/regex pinned to ours.
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD/src:/tmp/site
else
  export PYTHONPATH=$PWD/src
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
$PY -c "import torch, transformers, peft, accelerate, datasets, trl, pyarrow; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__, 'trl', trl.__version__, 'pyarrow', pyarrow.__version__, 'cuda', torch.cuda.is_available())"
MODEL=/tmp/ulma-bench-model-${SHAPE:-1b}
t0=$(date +%s)
$PY benchmarks/random_model.py .gpu/tokenizer "$MODEL" --shape "${SHAPE:-1b}" || exit 1
echo "model built in $(( $(date +%s) - t0 )) s"
# The pairs in the order of ONLY (what matters most first: a run cut short keeps it), each
# process capped, a failure reported and skipped; generation (9.3x on an H200) is left out
# by default to keep the run under 10 minutes: ONLY="generate-ulma" runs it.
$PY benchmarks/run.py --model "$MODEL" --data .gpu/data --rounds 1 --steps "${STEPS:-10}" --warmup "${WARMUP:-3}" \
  --keep-going --timeout "${TIMEOUT:-150}" --out "$OUT" --rows 256 --prompts 32 --new-tokens 64 \
  --only ${ONLY:-ulma-ulma-lora ulma-ulma-full ulma-dpo-lora ulma-dpo-full forward-ulma ulma-ulma-full-checkpointed} \
  --levers ${LEVERS:-forward-ulma-mb8 forward-ulma-compiled ulma-ulma-full-mb64 ulma-ulma-full-mb64-compiled} 2>&1 | tee "$OUT/log.txt"
