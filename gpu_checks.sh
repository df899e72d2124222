#!/usr/bin/env bash
# Every GPU check and benchmark in one go, for a machine with one NVIDIA GPU (an H100 or H200) and no
# network: the tests that need CUDA (they skip elsewhere), then `bench.py --device cuda`.
#
# Such a machine has torch 2.11 and Triton but an older transformers and no fla, so carry wheels. Once,
# on a machine with network, in the repository's root (Python 3.12 on the GPU machine):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       transformers==5.24.0 fla-core==0.6.0 flash-linear-attention==0.6.0
# then run `bash gpu_checks.sh` there with .whl/ beside it (the device tool: carry [".whl"], since
# .git/info/exclude keeps it from travelling otherwise). At most 9 minutes with the install; results in
# $OUT or runs/: 8 files (the device tool returns 8), each step's log and figures.
set -uo pipefail
out=${OUT:-runs}
mkdir -p "$out"
rm -f runs/bench/gpu-*.json          # a machine kept warm keeps them: no earlier run's figures pass for this one's
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, importlib.util as u; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'fla', 'importable' if u.find_spec('fla') else 'absent')"
# Most telling first, each under a time limit so that one slow part cannot take the whole session:
# fla's kernels against the plain ones (seconds), the benchmark (the compiled variant first), then
# compiled decoding and compiled layers (training) against the same models uncompiled, on tiny models.
# The tests' time limits interrupt pytest (SIGINT), so a run cut short still names each test it finished
# and prints the failures so far.
date +%T
timeout -s INT -k 5 60 python3 -m pytest -v --tb=short -p no:cacheprovider test_mtp.py -k "fla_" 2>&1 | tee "$out/gpu-tests-fla.txt"
date +%T
timeout 290 python3 bench.py --device cuda --time-limit 270 --json "$out/gpu-bench.json" 2>&1 | tee "$out/gpu-bench.txt"
cp runs/bench/gpu-*.json "$out"/ 2>/dev/null     # each variant's figures, also when the table was cut short
date +%T
timeout -s INT -k 5 160 python3 -m pytest -v --tb=short -p no:cacheprovider test_mtp.py -k "on_cuda" 2>&1 | tee "$out/gpu-tests-compiled.txt"
