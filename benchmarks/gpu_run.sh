#!/usr/bin/env bash
# GPU sessions, one part per device command (each well inside 10 minutes), from the repo root:
#   bash benchmarks/gpu_run.sh OUT_DIR PART
# PART is
#   tests   kernel, long-context, memory-plan and serving tests on the GPU (the gguf package
#           importable: the CLI runs in the memory-plan tests)
#   side    side by side with every peer: lora8b, then full1b (batch 4)
#   qlora   side by side on qlora8b, then the 8B LoRA sequence sweep (batch 1) and a profile
#   cells8b / cellsq8b  issue 16's 8B LoRA / QLoRA cells as they are judged: the default
#           with the input table in host memory (what the 16.7 / 7.0 GB plans pick) beside
#           Unsloth, one invocation each (Unsloth's wheels on PYTHONPATH; /tmp/l8b shared)
#   long    the longest batch-1 sequences under an 80 GB cap, activations offloaded
#   next    what 2026-12-02 left untimed: fewer checkpointed blocks for 8B LoRA, the fused
#           bf16 AdamW for 1B full
#   long350 QLoRA 8B at 350,000 tokens with exact-size offload (one ~6-minute step)
#   plan    the memory plan (`memory_budget_gb`) on the issue-16 rows: the blocks it
#           checkpoints and its estimate beside the measured peak, at several budgets
#   adamw   bf16 + stochastic-rounding AdamW vs fp32 masters vs a second seed, 500 steps of
#           SmolLM2 full SFT on chitchat (needs MODEL=path/to/SmolLM2.gguf and the
#           chitchat-dataset wheel on PYTHONPATH)
#   offload the issue-16 LoRA/QLoRA rows with checkpointed inputs offloaded to CPU memory (the
#           16.7 GB / 7.0 GB memory goals: what offload costs at 2 x 2048)
#   small   SmolLM2 LoRA on real chitchat lengths, packed, default kernels against the unfused
#           LoRA layers (kernels.lora false) at 32 and 64 conversations a step, with the peer in the same
#           run (MODEL=SmolLM2.gguf; the host-bound row of issue 16 item 4)
#   graph   the captured packed SmolLM2 LoRA step: GPU tests, a whole train run with and
#           without cuda_graph, graph/packed/padded/peft at 32, 64, 128 conversations (TOK=...)
#   graph8b 8B LoRA and QLoRA with every block kept (the `auto` plan on an 80 GB card) as
#           eager steps and as one captured step each (`llamaforge-graph`): the >= 18,000
#           tok/s LoRA cell, where the eager no-recompute step leaves launch gaps
#   graphckpt 8B LoRA and QLoRA with every block checkpointed (the default plan's shape at
#           Unsloth's memory), eager and captured with the recompute inside the graph
#   budget  8B LoRA under a 16.7 GB plan and QLoRA under 7.0 GB (Unsloth's peaks): the plan
#           offloads only as many checkpointed inputs as it needs (`activation_offload_layers`)
#   dpo     DPO on 8B LoRA: shared-prompt rows, two rows a pair, TRL DPOTrainer + peft
#   dpopre  the same with the reference log-probs precomputed in both stacks
#           (dpo.reference: precompute against precompute_ref_log_probs=True)
#   dpoq    DPO on 8B QLoRA: llamaforge's NF4 (and with the input table in host memory)
#           against TRL DPOTrainer + peft on bitsandbytes NF4 + DQ (bitsandbytes, trl,
#           datasets wheels on PYTHONPATH; the random model saved once to /tmp/l8b)
#   inbw    1B full fine-tuning with AdamW applied inside the backward (optim.step_in_backward:
#           gradients freed as applied) against the default, then under a 10 GB budget plan
#   fused   the LoRA layer as one autograd node (`kernels.lora`) and the residual add fused
#           into the norm (`kernels.residual_rmsnorm`), each against its unfused form,
#           8B LoRA and QLoRA at 2 x 2048, default checkpointing
#   decode  batch-1 decode: the step's pieces alone (decode_pieces.py), then the engine at
#           1/8/64 concurrent over 1 and 16 adapters and a batch-1 profile
#   serve8b serving, the issue-11 table with transformers + peft beside it: Llama-3.1-8B at
#           1/8/64 concurrent over 1 and 4 adapters (serve8b16: the 16-adapter rows; peft runs
#           one static batch per adapter, ~5 min of them alone), each one invocation
#   serve135m the same for SmolLM2-135M, all adapter counts in one invocation
#   interleaved  the default against its switches in one process, variants taking turns step
#           by step (benchmarks/interleaved.py): 8B LoRA and QLoRA against kernels.lora=false
#           and kernels.residual_rmsnorm=false, DPO against kernels.lora=false
#   keepattn  checkpointed blocks keeping the attention kernel's outputs (keep_attention=true,
#           `activation_checkpointing_keep_attention`) against the default, taking turns in one
#           process: 8B LoRA at 2 x 2048, then the DPO step
#   quality_hf    issue 16 item 6, the peer: transformers + peft at llamaforge's settings
#           (LR=1e-3 EPOCHS=3 HF_QUALITY=path/to/hf_quality.py MODEL=... DATA=dataset.json;
#           ../shared does not travel to the device: copy the script into the carried tree)
#   quality_ours  the same task with llamaforge's LoRA recipe (MODEL=...); run both parts in
#           one lease and put them in one table
# Untimed since 2026-12-08 (no device that session), in the order worth running: tests (the
# preference and keep_attention GPU tests among them), dpopre (DPO vs TRL with the fused
# default, queries without the prompt copy, the lay-out's own backward), dpoq, cells8b and
# cellsq8b (beside Unsloth), keepattn.
# Baselines need their packages importable (BASELINES.md: wheels on PYTHONPATH); a missing
# one is reported as skipped. Every benchmark has its own time limit so one slow part cannot
# eat the others' time. Random models for the from-disk stacks are kept in /tmp between parts.
set -uo pipefail
out=${1:-gpu_out}
part=${2:-tests}
mkdir -p "$out"
export PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

tp() {  # name time-limit args...: one train_throughput.py invocation, its table printed
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python3 benchmarks/train_throughput.py --out "$out/$name.json" "$@" \
    >"$out/$name.log" 2>&1
  echo "== $name (exit $?)"
  grep -v "^  \|^training\|^measuring\|^saving" "$out/$name.log" | tail -22
}

case $part in
tests)
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_basic.py \
    tests/test_kernels_ce.py tests/test_kernels_nf4.py tests/test_kernels_dispatch.py \
    tests/test_long_context.py tests/test_kernels_adamw.py tests/test_memory_plan.py \
    tests/test_serve_graphs.py tests/test_serve_engine.py tests/test_lora_fused.py \
    tests/test_keep_attention.py tests/test_preference.py \
    tests/test_serve_fused.py tests/test_kernels_gemv.py tests/test_kernels_decode_attention.py \
    tests/test_optim_in_backward.py 2>&1 | tail -25 | tee "$out/tests.log"
  ;;
side)
  tp throughput_lora8b 290 --workload lora8b --stacks llamaforge,hf,hf-liger,unsloth \
    --steps 4 --warmup 2 --model-dir /tmp/l8b
  tp throughput_full1b 230 --workload full1b \
    --stacks llamaforge,llamaforge-fp32,llamaforge-bf16,hf,hf-liger,unsloth \
    --steps 4 --warmup 2 --model-dir /tmp/l1b
  ;;
qlora)
  tp throughput_qlora8b 320 --workload qlora8b --stacks llamaforge,hf,hf-liger,unsloth \
    --steps 4 --warmup 2 --model-dir /tmp/l8b
  tp seqs_lora8b 150 --workload lora8b --stacks llamaforge --seqs 1024,2048,4096,8192,16384 \
    --steps 3 --warmup 1
  tp profile_lora8b 70 --workload lora8b --stacks llamaforge --steps 2 --warmup 2 --profile
  grep -A40 "^profile of one" "$out/profile_lora8b.log" | cut -c1-200 | head -45
  ;;
cells8b)
  tp cells_lora8b 330 --workload lora8b --stacks llamaforge-host,llamaforge,unsloth \
    --steps 6 --warmup 2 --model-dir /tmp/l8b
  ;;
cellsq8b)
  tp cells_qlora8b 360 --workload qlora8b --stacks llamaforge-host,llamaforge,unsloth \
    --steps 6 --warmup 2 --model-dir /tmp/l8b
  ;;
long)
  tp longest_lora8b 170 --workload lora8b --stacks llamaforge-offload --seqs 65536,131072 \
    --steps 1 --warmup 0 --mem-cap-gib 79
  tp longest_qlora8b 390 --workload qlora8b --stacks llamaforge-offload --seqs 131072,262144 \
    --steps 1 --warmup 0 --mem-cap-gib 79
  ;;
next)
  for n in 0 8 16; do
    tp "ckpt${n}_lora8b" 80 --workload lora8b --stacks llamaforge --ckpt-layers "$n" \
      --steps 4 --warmup 2
  done
  tp bf16_full1b 90 --workload full1b --stacks llamaforge,llamaforge-bf16 \
    --steps 4 --warmup 2
  ;;
plan)
  for b in 16.7 24 40 auto; do
    tp "plan${b}_lora8b" 100 --workload lora8b --stacks llamaforge --memory-budget "$b" \
      --steps 3 --warmup 2
  done
  tp plan10_full1b 90 --workload full1b --stacks llamaforge --memory-budget 10 \
    --steps 3 --warmup 2
  tp plan7_qlora8b 110 --workload qlora8b --stacks llamaforge --memory-budget 7 \
    --steps 3 --warmup 2
  ;;
adamw)
  timeout 560 python3 benchmarks/optimizer_curve.py --model "${MODEL:?set MODEL}" --steps 500 \
    --out "$out/optimizer_curve.json" >"$out/optimizer_curve.log" 2>&1
  echo "== optimizer_curve (exit $?)"
  tail -3 "$out/optimizer_curve.log"
  ;;
offload)
  tp offload_lora8b 120 --workload lora8b --stacks llamaforge,llamaforge-offload --steps 4 --warmup 2
  tp offload_qlora8b 140 --workload qlora8b --stacks llamaforge,llamaforge-offload --steps 4 \
    --warmup 2
  ;;
small)
  for bs in 32 64; do
    for k in default unfused-lora; do
      modes=packed; [ "$k" = default ] && modes=hf,padded,packed
      timeout 240 python3 benchmarks/real_lengths.py --model "${MODEL:?set MODEL}" \
        --tokenizer "$MODEL" --modes $modes --lora-dropout 0 --bs $bs --steps 20 --warmup 3 \
        --kernels $k --out "$out/real_lengths_bs${bs}_$k.json" >"$out/real_lengths_bs${bs}_$k.log" 2>&1
      echo "== real_lengths bs $bs kernels $k (exit $?)"
      grep -i "tokens/s" "$out/real_lengths_bs${bs}_$k.log" | tail -4
    done
  done
  ;;
graph)
  # the captured packed step: its GPU tests (the loop path included), a whole llamaforge
  # train with and without cuda_graph, then graph / packed / padded / peft at 16k, 32k and
  # 64k real tokens a step (TOK: the bundled tokenizer saved by save_tokenizer; the
  # chitchat-dataset and gguf wheels on PYTHONPATH)
  timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_graph_step.py 2>&1 | tail -3
  timeout 200 python3 benchmarks/graph_loop.py --tokenizer "${TOK:?set TOK}" --steps 40 \
    --rows 16 --out "$out/graph_loop.json" >"$out/graph_loop.log" 2>&1
  echo "== graph_loop (exit $?)"; tail -2 "$out/graph_loop.log"
  for bs in 32 64 128; do
    modes=graph,packed,padded,hf; [ $bs = 128 ] && modes=graph,packed,padded
    timeout 200 python3 benchmarks/real_lengths.py --model preset:smollm2-135m --tokenizer "$TOK" \
      --modes $modes --lora-dropout 0 --bs $bs --steps 12 --warmup 3 \
      --out "$out/real_lengths_graph_bs$bs.json" >"$out/real_lengths_graph_bs$bs.log" 2>&1
    echo "== real_lengths graph bs $bs (exit $?)"; grep "x$" "$out/real_lengths_graph_bs$bs.log"
  done
  ;;
graph8b)
  tp graph_lora8b 200 --workload lora8b --stacks llamaforge,llamaforge-graph --ckpt-layers 0 \
    --steps 6 --warmup 2
  tp graph_qlora8b 200 --workload qlora8b --stacks llamaforge,llamaforge-graph --ckpt-layers 0 \
    --steps 6 --warmup 2
  ;;
graphckpt)
  tp graphckpt_lora8b 200 --workload lora8b --stacks llamaforge,llamaforge-graph \
    --steps 6 --warmup 2
  tp graphckpt_qlora8b 200 --workload qlora8b --stacks llamaforge,llamaforge-graph \
    --steps 6 --warmup 2
  ;;
budget)
  tp budget_lora8b 150 --workload lora8b --stacks llamaforge --memory-budget 16.7 \
    --steps 4 --warmup 2
  tp budget_qlora8b 150 --workload qlora8b --stacks llamaforge --memory-budget 7.0 \
    --steps 4 --warmup 2
  ;;
dpo)
  # shared-prompt DPO and RM rows against two rows and TRL (trl, datasets wheels on PYTHONPATH)
  timeout 420 python3 benchmarks/preference_speed.py --steps 4 --warmup 2 \
    --stacks llamaforge-dpo,llamaforge-dpo-two-rows,trl-dpo --out "$out/dpo_shared.json" \
    >"$out/dpo_shared.log" 2>&1
  echo "== dpo (exit $?)"; grep "^| " "$out/dpo_shared.log" | tail -8
  ;;
dpopre)
  timeout 420 python3 benchmarks/preference_speed.py --steps 4 --warmup 2 \
    --stacks llamaforge-dpo,trl-dpo,llamaforge-dpo-precomputed,trl-dpo-precomputed \
    --out "$out/dpo_precomputed.json" >"$out/dpo_precomputed.log" 2>&1
  echo "== dpopre (exit $?)"; grep "^| " "$out/dpo_precomputed.log" | tail -10
  ;;
dpoq)
  timeout 480 python3 benchmarks/preference_speed.py --workload qlora8b --steps 4 --warmup 2 \
    --stacks llamaforge-dpo,llamaforge-dpo-host,trl-dpo --model-dir /tmp/l8b \
    --out "$out/dpo_qlora.json" >"$out/dpo_qlora.log" 2>&1
  echo "== dpoq (exit $?)"; grep "^| " "$out/dpo_qlora.log" | tail -8
  ;;
inbw)
  tp inbw_full1b 150 --workload full1b --stacks llamaforge,llamaforge-inbw --steps 4 --warmup 2
  tp inbw_full1b_10gb 150 --workload full1b --stacks llamaforge-inbw --memory-budget 10 \
    --steps 4 --warmup 2
  ;;
interleaved)
  for w in lora8b qlora8b; do
    timeout 200 python3 benchmarks/interleaved.py --workload $w --rounds 24 \
      --variants "default;kernels.lora=false;kernels.residual_rmsnorm=false" \
      --out "$out/interleaved_$w.json" >"$out/interleaved_$w.log" 2>&1
    echo "== interleaved $w (exit $?)"; grep "^| " "$out/interleaved_$w.log"
  done
  timeout 200 python3 benchmarks/interleaved.py --workload lora8b --objective dpo --rounds 12 \
    --variants "default;kernels.lora=false" --out "$out/interleaved_dpo.json" \
    >"$out/interleaved_dpo.log" 2>&1
  echo "== interleaved dpo (exit $?)"; grep "^| " "$out/interleaved_dpo.log"
  ;;
keepattn)
  timeout 200 python3 benchmarks/interleaved.py --workload lora8b --rounds 16 \
    --variants "default;keep_attention=true" --out "$out/keepattn_lora8b.json" \
    >"$out/keepattn_lora8b.log" 2>&1
  echo "== keepattn lora8b (exit $?)"; grep "^| " "$out/keepattn_lora8b.log"
  timeout 200 python3 benchmarks/interleaved.py --workload lora8b --objective dpo --rounds 10 \
    --variants "default;keep_attention=true" --out "$out/keepattn_dpo.json" \
    >"$out/keepattn_dpo.log" 2>&1
  echo "== keepattn dpo (exit $?)"; grep "^| " "$out/keepattn_dpo.log"
  ;;
fused)
  tp fused_lora8b 150 --workload lora8b \
    --stacks llamaforge,llamaforge-unfused-lora,llamaforge-unfused-residual --steps 4 --warmup 2
  tp fused_qlora8b 130 --workload qlora8b --stacks llamaforge,llamaforge-unfused-lora \
    --steps 4 --warmup 2
  ;;
decode)
  timeout 150 python3 benchmarks/decode_pieces.py "$out/decode_pieces.json" >"$out/decode_pieces.log" 2>&1
  echo "== decode_pieces (exit $?)"
  grep -A40 '"attention"' "$out/decode_pieces.json" | head -60
  timeout 300 python3 benchmarks/serve_throughput.py --preset llama3.1-8b \
    --stacks llamaforge,llamaforge-unfused --concurrency 1,8,64 --adapters 1,16 \
    --out "$out/serve_8b.json" >"$out/serve.log" 2>&1
  echo "== serve (exit $?)"
  grep "^| \|bound" "$out/serve.log"
  timeout 60 python3 benchmarks/serve_throughput.py --preset llama3.1-8b --stacks llamaforge \
    --concurrency 1 --adapters 1 --profile-at 1,1 >"$out/serve_profile.log" 2>&1
  echo "== serve profile (exit $?)"
  ;;
serve8b | serve8b16)
  adapters=1,4; [ "$part" = serve8b16 ] && adapters=16
  timeout 560 python3 benchmarks/serve_throughput.py --preset llama3.1-8b --stacks llamaforge,hf \
    --adapters $adapters --out "$out/$part.json" >"$out/$part.log" 2>&1
  echo "== $part (exit $?)"
  grep "^| \|bound" "$out/$part.log"
  ;;
serve135m)
  timeout 560 python3 benchmarks/serve_throughput.py --preset smollm2-135m --stacks llamaforge,hf \
    --out "$out/serve135m.json" >"$out/serve135m.log" 2>&1
  echo "== serve135m (exit $?)"
  grep "^| \|bound" "$out/serve135m.log"
  ;;
quality_hf)
  SECONDS=0
  LR=${LR:-1e-3} EPOCHS=${EPOCHS:-3} timeout 560 python3 "${HF_QUALITY:?set HF_QUALITY}" \
    "${MODEL:?set MODEL}" "${DATA:?set DATA}" >"$out/quality_hf.log" 2>&1
  echo "== quality_hf (exit $?, ${SECONDS}s)"
  tail -5 "$out/quality_hf.log"
  ;;
quality_ours)
  SECONDS=0
  timeout 560 python3 benchmarks/quality.py --model "${MODEL:?set MODEL}" --methods lora \
    --runs /tmp/quality --out "$out/quality_lora.json" >"$out/quality_ours.log" 2>&1
  echo "== quality_ours (exit $?, ${SECONDS}s)"
  tail -5 "$out/quality_ours.log"
  ;;
long350)
  tp longest350_qlora8b 560 --workload qlora8b --stacks llamaforge-offload --seqs 350000 \
    --steps 1 --warmup 0 --mem-cap-gib 79
  ;;
*)
  echo "unknown part $part (tests, side, qlora, long, next, long350, plan, adamw, offload, fused, decode," \
    "quality_hf, quality_ours, inbw, small)" >&2
  exit 2
  ;;
esac
