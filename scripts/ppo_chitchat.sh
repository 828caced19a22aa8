#!/usr/bin/env bash
# RLHF with PPO on real text (CPU minutes): set up, train the chitchat reward model if it is
# not there yet (configs/rm_chitchat.yaml -> runs/rm-chitchat), then PPO on SmolLM2-135M-
# Instruct with it (configs/ppo_chitchat.yaml -> runs/ppo-chitchat). Prints held-out mean
# reward and KL to the reference before and after, and a sample answer before and after.
# Extra arguments are PPO config overrides, e.g. `bash scripts/ppo_chitchat.sh max_steps=24`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if [ ! -f runs/rm-chitchat/adapter/adapter_config.json ]; then
  llamaforge train configs/rm_chitchat.yaml
fi
llamaforge train configs/ppo_chitchat.yaml "$@"
