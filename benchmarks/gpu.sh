#!/usr/bin/env bash
# The checks that need a GPU, in one command (under 8 minutes on one GPU): the CUDA tests (test_vllm's engine
# tests skip without vLLM), the environment's fast path on the device, then the throughput ratios at the 100M size,
# each against its baseline measured in the same run, and the multi-turn KV reuse against re-encoding. Run from the repository root in a venv with lmgym installed
# (`pip install -e ".[test]"` over a CUDA build of torch); prints what it measured and writes $OUT/gpu/ when set.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}/gpu"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(0))"
timeout 240 python -m pytest -q -x tests/test_vllm.py tests/test_fast_paths.py tests/test_env_contract.py \
    tests/test_shared_prompts.py 2>&1 | tail -5
timeout 120 python benchmarks/env_throughput.py --size 100M --device cuda --repeats 3 | tee "$out/env_throughput.txt"
timeout 120 python benchmarks/agent_throughput.py --size 100M --device cuda --repeats 3 | tee "$out/agent_throughput.txt"
timeout 90 python benchmarks/multi_turn_kv.py --device cuda --json "$out/multi_turn_kv.json" | tee "$out/multi_turn_kv.txt"
