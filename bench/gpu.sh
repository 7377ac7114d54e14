#!/usr/bin/env bash
# The CUDA checks and benchmarks in one run, on a machine with a GPU, a CUDA build of torch and
# onnxruntime-gpu (with pbp-fx installed):
#
#     bash bench/gpu.sh OUT_DIR [STEP ...]     # steps: tests train latency (default: all three)
#
# OUT_DIR/env.txt                 GPU, torch, onnxruntime and its providers
# OUT_DIR/tests.txt               the tests that need CUDA (the suite skips them without a GPU)
# OUT_DIR/train_overhead_cuda.md  bench/train_overhead.py --device cuda (torch; peak = CUDA allocator)
# OUT_DIR/latency_cuda.md         bench/latency.py --device cuda (ONNX Runtime's CUDA provider)
#
# Each step has its own time limit (seconds; GPU_TESTS_S, GPU_TRAIN_S, GPU_LATENCY_S), so one that
# hangs leaves the others their time; together they fit one 10-minute command.
set -u
out=${1:?usage: bash bench/gpu.sh OUT_DIR}
shift
steps=${*:-tests train latency}
mkdir -p "$out" && out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here" || exit 1

{
    nvidia-smi -L
    python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
torch.cuda.get_device_name()); print('onnxruntime', o.__version__, o.get_available_providers())"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

want() { [[ " $steps " == *" $1 "* ]]; }

want tests && {
echo "== tests that need CUDA"
timeout "${GPU_TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider \
    tests/test_perforated.py::test_to_cuda \
    tests/test_training.py::test_training_device_is_the_cpu_or_a_gpu_every_process_can_have \
    tests/test_distributed.py::test_one_nccl_rank_on_the_gpu_trains_as_one_process_on_the_cpu \
    tests/test_cli.py::test_run_on_the_cuda_provider_matches_the_model \
    tests/test_job.py::test_a_run_on_the_gpu_killed_in_the_dendrite_phase_resumes_on_the_gpu_like_an_uninterrupted_run_or_on_the_cpu \
    > "$out/tests.txt" 2>&1
echo "tests: exit $?"; tail -n 3 "$out/tests.txt"
}

want train && {
echo "== training-step overhead on CUDA"
timeout "${GPU_TRAIN_S:-180}" python3 bench/train_overhead.py --device cuda --rounds 9 --steps 10 \
    > "$out/train_overhead_cuda.md" 2>&1
echo "train_overhead: exit $?"
}

want latency && {
echo "== ONNX Runtime CUDA provider latency"
timeout "${GPU_LATENCY_S:-200}" python3 bench/latency.py --device cuda --ks 1 --batches 1 32 --min-time 0.5 \
    --models resnet18 mobilenet_v2 efficientnet_b0 vit_tiny --out "$out/latency_cuda.md" \
    > "$out/latency_log.txt" 2>&1
echo "latency: exit $?"
}
