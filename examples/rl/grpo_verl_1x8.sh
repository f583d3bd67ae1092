#!/usr/bin/env bash
# GRPO with verl on one node of 8 H100 (80 GB), from an exported SED-SFT (or CE) checkpoint.
#
#   MODEL_PATH=hf/qwen25-math-7b-sed TRAIN_FILE=data/rl/math_train.parquet VAL_FILE=data/rl/math500.parquet \
#       bash examples/rl/grpo_verl_1x8.sh [hydra overrides...]
#
# MODEL_PATH: the Hugging Face directory tools/convert_mcore_to_hf.py wrote (with --hf-template,
# so the tokenizer, its chat template and generation_config.json come along). TRAIN_FILE and
# VAL_FILE: parquet written by examples/rl/prepare_data.py, or the published training set
# (pppa2019/SED-SFT data/math_train_data_filtered_qwen25_revised.parquet, 2,069 MATH problems)
# as it is: the reward below reads only reward_model.ground_truth. The reward is
# sed_megatron.eval.reward.math_reward through examples/rl/verl_reward.py (1 when the response
# states the reference answer as `#### x` or \boxed{x}, else 0).
#
# Settings: the published RL script, pppa2019/SED-SFT train_scripts/grpo_math-cumsum.sh (commit
# 6a89ea3), run there on an SFT'd Qwen2.5-Math-7B-Instruct (line 28) with the MATH set above
# (line 38); line numbers refer to that file:
#   GRPO, no KL in the reward nor in the loss    lines 72-74, 163-165
#   clip ratio 0.2 low / 0.28 high               lines 75-76, 166-167
#   prompts <= 1024 tokens (cut from the left),  lines 85-86, 158-160
#     responses <= 3072 tokens
#   256 prompts per rollout x 8 responses,       lines 87, 89-90, 161-162, 181
#     optimizer steps on 32 prompts (8 per rollout)
#   dynamic batch sizes, 4096 tokens per GPU     lines 95-97, 169-174
#   padding removed, dropout 0, gradient         lines 168, 176-179
#     checkpointing
#   actor lr 1e-6, no entropy bonus, grad clip 1 lines 180, 184-185
#   FSDP over all GPUs, parameter and optimizer  lines 94, 98, 182-183, 186, 196-198
#     offload, no sequence parallelism
#   vLLM rollout at TP 2, 80 % of GPU memory,    lines 99, 187-189, 195, 199
#     chunked prefill
#   validation samples at temperature 1          lines 190-194
#   10 epochs, checkpoint every 20 steps,        lines 200-210
#     resume, no validation before training
#   (everything else: verl's defaults: token-mean loss, advantages divided by the group std,
#    AdamW weight decay 0.01, constant LR, rollout temperature 1.0)
# The published script defines GEN_PROMPT_BSZ, USE_TOKEN_LEVEL_LOSS, ENABLE_FILTER_GROUPS,
# ENABLE_OVERLONG_BUFFER and others (lines 77-82, 88) but never passes them to verl: left out
# here. It submitted the job to a multi-node Ray cluster (lines 104, 149-154, 204); this runs on
# one node with verl's local Ray: a rollout of 256 x 8 responses takes longer, the run is the
# same. Its NCCL and Ray variables (lines 47-67) describe that cluster's network, and
# VLLM_ATTENTION_BACKEND=XFORMERS (line 49) an older vLLM; none is set here. The published
# validation set, aime-2024.parquet (line 39), is not in its repository.
# Memory: fp32 master weights, gradients and AdamW moments are ~16 bytes per parameter (~120 GB
# for 7.6B), sharded over 8 GPUs and offloaded to the host, so that vLLM can hold its bf16 copy
# in 80 % of each GPU.
#
# Status: written against verl's configuration at volcengine/verl b178a3c (0.8.0.dev; every key
# below exists there) and the custom-reward interface of verl/trainer/ppo/reward.py; NOT run:
# no GPU has been available to this project. What has run is the CPU test of the same reward and
# data (tests/examples/test_rl.py). After training, turn an FSDP checkpoint back into a Hugging
# Face directory with:
#   python -m verl.model_merger merge --backend fsdp --local_dir $SAVE_DIR/global_step_N/actor --target_dir hf/OUT
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)

: "${MODEL_PATH:?set MODEL_PATH to the exported Hugging Face directory}"
: "${TRAIN_FILE:?set TRAIN_FILE to a parquet from examples/rl/prepare_data.py}"
: "${VAL_FILE:?set VAL_FILE to a parquet from examples/rl/prepare_data.py}"
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
PROJECT_NAME=${PROJECT_NAME:-sed-sft-grpo}
EXP_NAME=${EXP_NAME:-$(basename "$MODEL_PATH")}
SAVE_DIR=${SAVE_DIR:-rl_ckpt/$EXP_NAME}
LOGGER=${LOGGER:-"['console']"}   # the published run: ['console','wandb'] with wandb offline
PYTHON=${PYTHON:-python3}

MAX_PROMPT_LENGTH=1024
MAX_RESPONSE_LENGTH=3072
MAX_TOKENS=$((MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH))

# The RL frameworks need more from the directory than transformers does: fail here, in one line,
# rather than in a Ray worker.
"$PYTHON" "$REPO/examples/rl/check_export.py" "$MODEL_PATH" --for verl

data=(
  data.train_files="$TRAIN_FILE"
  data.val_files="$VAL_FILE"
  data.prompt_key=prompt
  data.truncation=left
  data.max_prompt_length=$MAX_PROMPT_LENGTH
  data.max_response_length=$MAX_RESPONSE_LENGTH
  data.train_batch_size=256
)
algorithm=(
  algorithm.adv_estimator=grpo
  algorithm.kl_ctrl.kl_coef=0.0
  actor_rollout_ref.actor.kl_loss_coef=0.0
  actor_rollout_ref.actor.clip_ratio_low=0.2
  actor_rollout_ref.actor.clip_ratio_high=0.28
  actor_rollout_ref.actor.entropy_coeff=0
  actor_rollout_ref.actor.optim.lr=1e-6
  actor_rollout_ref.actor.grad_clip=1.0
  actor_rollout_ref.actor.ppo_mini_batch_size=32
  actor_rollout_ref.rollout.n=8
)
model=(
  actor_rollout_ref.model.path="$MODEL_PATH"
  actor_rollout_ref.model.use_remove_padding=True
  actor_rollout_ref.model.enable_gradient_checkpointing=True
  # the published script also zeroes embd_pdrop and resid_pdrop, GPT-2 names that Llama and Qwen2 configs lack
  +actor_rollout_ref.model.override_config.attention_dropout=0.
)
memory=(
  actor_rollout_ref.actor.use_dynamic_bsz=True
  actor_rollout_ref.ref.log_prob_use_dynamic_bsz=True
  actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu=$MAX_TOKENS
  actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=$MAX_TOKENS
  actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=$MAX_TOKENS
  actor_rollout_ref.actor.ulysses_sequence_parallel_size=1
  actor_rollout_ref.ref.ulysses_sequence_parallel_size=1
  actor_rollout_ref.actor.fsdp_config.param_offload=True
  actor_rollout_ref.actor.fsdp_config.optimizer_offload=True
  actor_rollout_ref.ref.fsdp_config.param_offload=True
  actor_rollout_ref.actor.fsdp_config.fsdp_size=-1
)
rollout=(
  actor_rollout_ref.rollout.name=vllm
  actor_rollout_ref.rollout.tensor_model_parallel_size=2
  actor_rollout_ref.rollout.gpu_memory_utilization=0.8
  actor_rollout_ref.rollout.max_num_batched_tokens=$MAX_TOKENS
  actor_rollout_ref.rollout.enable_chunked_prefill=True
  actor_rollout_ref.rollout.val_kwargs.top_k=-1
  actor_rollout_ref.rollout.val_kwargs.top_p=1.0
  actor_rollout_ref.rollout.val_kwargs.temperature=1.0
  actor_rollout_ref.rollout.val_kwargs.n=1
  actor_rollout_ref.rollout.val_kwargs.do_sample=True
)
reward=(
  custom_reward_function.path="$REPO/examples/rl/verl_reward.py"
  custom_reward_function.name=compute_score
)
trainer=(
  trainer.logger="$LOGGER"
  trainer.project_name="$PROJECT_NAME"
  trainer.experiment_name="$EXP_NAME"
  trainer.n_gpus_per_node=$NPROC_PER_NODE
  trainer.nnodes=$NNODES
  trainer.test_freq=5000
  trainer.save_freq=20
  trainer.total_epochs=10
  trainer.default_local_dir="$SAVE_DIR"
  trainer.resume_mode=auto
  trainer.val_before_train=False
)

mkdir -p "$SAVE_DIR"
export HYDRA_FULL_ERROR=1
"$PYTHON" -m verl.trainer.main_ppo "${data[@]}" "${algorithm[@]}" "${model[@]}" "${memory[@]}" \
  "${rollout[@]}" "${reward[@]}" "${trainer[@]}" "$@" 2>&1 | tee -a "$SAVE_DIR/train.log"
