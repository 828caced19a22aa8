#!/usr/bin/env bash
# Alpaca-LoRA end to end on the CPU: SmolLM2-135M-Instruct grows instruction data from our
# seed tasks (llamaforge self-instruct), is LoRA-fine-tuned on it
# (configs/alpaca_selfinstruct_lora.yaml), and is evaluated on held-out data before and
# after: the held-out part of the generated tasks (eval.json of the run) and human-written
# question/answer pairs it never saw (the chatterbot-corpus test split of
# configs/alpaca_lora.yaml). Generation resumes if stopped: run the script again.
#   NUM=300 bash scripts/alpaca_selfinstruct.sh   (NUM: tasks to keep, default 300; DATA, RUN:
#   the generated file and the run folder; OMP_NUM_THREADS=1 helps on a busy machine)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
NUM=${NUM:-300}
DATA=${DATA:-data/self_instruct_smollm2.json}
RUN=${RUN:-runs/alpaca-selfinstruct-lora}
llamaforge self-instruct --model smollm2-135m-instruct --num "$NUM" --out "$DATA" \
  --batch 16 --max-tokens 256 --temperature 0.7 --top-p 0.9 --prompt-tasks 2 \
  --prompt-generated 1 --max-prompts $((NUM * 2 + 16))
python - "$DATA" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
print(f"{len(rows)} tasks, {sum(bool(r['input']) for r in rows)} with an input; three of them:")
for r in rows[:3]:
    print(json.dumps(r, ensure_ascii=False))
PY
llamaforge train configs/alpaca_selfinstruct_lora.yaml data.path="$DATA" output_dir="$RUN"
[ -f data/chatterbot_alpaca.json ] || python scripts/make_alpaca_data.py
HELD="eval.generate.max_examples=24 eval.generate.max_new_tokens=32 eval.max_batches=4"
# shellcheck disable=SC2086
llamaforge eval configs/alpaca_lora.yaml $HELD >"$RUN/chatterbot_before.json"
# shellcheck disable=SC2086
llamaforge eval configs/alpaca_lora.yaml $HELD --adapter "$RUN/adapter" >"$RUN/chatterbot_after.json"
python - "$RUN" <<'PY'
import json, sys
run = sys.argv[1]
gen = json.load(open(f"{run}/eval.json"))
b, a = (json.load(open(f"{run}/chatterbot_{k}.json")) for k in ("before", "after"))
print(f"held-out generated tasks: {gen['before']} -> {gen['after']}")
keys = ("val_loss", "exact_match", "rouge_l")
print("chatterbot held-out:", {k: (round(b[k], 4), round(a[k], 4)) for k in keys if k in b})
PY
