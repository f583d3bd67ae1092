"""GRPO with TRL on an exported checkpoint: the published RL settings, the reward of sed_megatron.eval.reward.

    pip install -e ".[rl]"        # TRL (>= 1.15) and pyarrow
    python examples/rl/grpo_trl.py --model hf/llama32-3b-sed --train-data data/rl/gsm8k_train.parquet \\
        --output-dir rl/llama32-3b-sed-trl
    # several GPUs: accelerate launch --num_processes 8 examples/rl/grpo_trl.py ... [--use-vllm]

--model is a Hugging Face directory (tools/convert_mcore_to_hf.py --hf-template ... writes one);
--train-data is the parquet examples/rl/prepare_data.py writes for verl (chat-message prompts,
reward_model.ground_truth). The prompts go through the checkpoint's chat template; generation
stops at the tokenizer's eos and at every eos id of generation_config.json (TRL >= 1.15), so an
end-of-turn token that is not the tokenizer's eos must be listed there. The reward is
math_reward: 1.0 when the completion states (`#### x` or `\\boxed{x}`) the reference answer.
--output-dir receives the trained model, its tokenizer and chat template (a directory that
transformers, tools/eval_diversity.py and vLLM load) and metrics.jsonl (TRL's log: reward,
reward_std, loss, ... one line per logged step).

Defaults follow the published verl run (SED-SFT, train_scripts/grpo_math-cumsum.sh; verl's
defaults where the script sets nothing):
  --learning-rate 1e-6                 actor.optim.lr=1e-6                       (line 180)
  --num-generations 8                  N_RESP_PER_PROMPT=8, rollout.n            (lines 90, 162)
  --prompts-per-rollout 256            TRAIN_PROMPT_BSZ=256, data.train_batch_size (lines 87, 161)
  --prompts-per-update 32              TRAIN_PROMPT_MINI_BSZ=32, ppo_mini_batch_size (lines 89, 181):
                                       8 optimizer steps per rollout, each on 32 x 8 completions
  epsilon 0.2, epsilon_high 0.28       CLIP_RATIO_LOW/HIGH, clip_ratio_low/high  (lines 75-76, 166-167)
  beta 0 (no reference model)          KL_COEF=0, KL_LOSS_COEF=0                 (lines 73-74, 164-165)
  --max-completion-length 3072         MAX_RESPONSE_LENGTH=3072                  (line 86)
  --max-prompt-length 1024             MAX_PROMPT_LENGTH=1024                    (line 85); longer prompts
                                       are dropped (verl truncates them from the left, line 158)
  max_grad_norm 1.0, no entropy bonus  grad_clip=1.0, entropy_coeff=0            (lines 184-185)
  --epochs 10, --save-every-rollouts 20  total_epochs=10, save_freq=20          (lines 206-207)
  gradient checkpointing               enable_gradient_checkpointing=True        (line 179)
  loss_type "dapo"                     verl's default loss_agg_mode token-mean: every token of the
                                       batch weighs the same
  scale_rewards "group"                verl's default norm_adv_by_std_in_grpo=True
  weight decay 0.01, constant LR, temperature 1.0, top-p 1.0: verl's defaults
Not reproduced here: verl's dual-clip (clip_ratio_c=3), its dynamic batch sizes and FSDP
offload, vLLM at tensor parallel 2. A model above ~1B parameters needs ZeRO-3 or FSDP through
`accelerate launch --config_file`; examples/rl/grpo_verl_1x8.sh is the recipe at scale.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from transformers import TrainerCallback  # noqa: E402

from sed_megatron.eval.reward import math_reward  # noqa: E402
from sed_megatron.utils import fail  # noqa: E402

PROG = "grpo_trl.py"


def completion_text(completion):
    """The text of one TRL completion: a string, or the messages of a conversational prompt."""
    if isinstance(completion, str):
        return completion
    return "".join(message["content"] for message in completion if message.get("role") == "assistant")


def make_reward_function(strict=True):
    """A TRL reward function over the rows of examples/rl/prepare_data.py (it reads reward_model.ground_truth)."""
    def math_accuracy(completions, reward_model, **kwargs):
        return [math_reward(completion_text(c), row["ground_truth"], strict=strict)
                for c, row in zip(completions, reward_model, strict=True)]

    return math_accuracy


def load_rows(path, tokenizer, max_prompt_length):
    """The parquet's rows as a datasets.Dataset (in memory, no cache files), without prompts over the limit."""
    import datasets
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = {"prompt", "reward_model"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: no column {sorted(missing)[0]!r} (write it with examples/rl/prepare_data.py)")
    dataset = datasets.Dataset(datasets.table.InMemoryTable(table))
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template (the prompts are chat messages)")

    def fits(row):
        ids = tokenizer.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True)
        return len(ids["input_ids"]) <= max_prompt_length

    kept = dataset.filter(fits)
    if len(kept) < len(dataset):
        print(f"{PROG}: {len(dataset) - len(kept)} of {len(dataset)} prompts are longer than {max_prompt_length} "
              f"tokens and left out")
    if len(kept) == 0:
        raise ValueError(f"{path}: no prompt fits in --max-prompt-length {max_prompt_length}")
    return kept


def batch_layout(options, world_size):
    """(gradient_accumulation_steps, generation_batch_size) of the published batch sizes, in completions."""
    per_update = options.prompts_per_update * options.num_generations
    per_micro_step = options.per_device_batch_size * world_size
    if per_update % per_micro_step or options.prompts_per_rollout % options.prompts_per_update:
        raise ValueError(f"--prompts-per-update x --num-generations ({per_update}) must be a multiple of "
                         f"--per-device-batch-size x processes ({per_micro_step}), and --prompts-per-rollout a "
                         f"multiple of --prompts-per-update")
    return per_update // per_micro_step, options.prompts_per_rollout * options.num_generations


class MetricsFile(TrainerCallback):
    """Every log record as one line of PATH (main process only), as training goes."""

    def __init__(self, path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face directory (the exported SFT checkpoint)")
    parser.add_argument("--train-data", required=True, help="parquet from examples/rl/prepare_data.py")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--num-generations", type=int, default=8, help="completions per prompt (the GRPO group)")
    parser.add_argument("--prompts-per-rollout", type=int, default=256, help="prompts generated for at once")
    parser.add_argument("--prompts-per-update", type=int, default=32, help="prompts per optimizer step")
    parser.add_argument("--per-device-batch-size", type=int, default=4, help="completions per forward pass and device")
    parser.add_argument("--max-prompt-length", type=int, default=1024)
    parser.add_argument("--max-completion-length", type=int, default=3072)
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (default: --epochs)")
    parser.add_argument("--save-every-rollouts", type=int, default=20, help="0: only the final model")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--last-number-fallback", action="store_true",
                        help="also reward a completion whose last number is the answer (default: only a stated "
                             "`#### x` or \\boxed{x})")
    parser.add_argument("--use-vllm", action="store_true", help="generate with vLLM in the training processes")
    parser.add_argument("--logging-steps", type=int, default=1)
    return parser.parse_args(argv)


def main(argv=None):
    options = parse_args(sys.argv[1:] if argv is None else argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    on_gpu = torch.cuda.is_available()
    try:
        if not os.path.exists(os.path.join(options.model, "config.json")):
            raise ValueError(f"{options.model}: no config.json (--model must be a Hugging Face model directory)")
        grad_accum, generation_batch = batch_layout(options, int(os.environ.get("WORLD_SIZE", "1")))
        tokenizer = AutoTokenizer.from_pretrained(options.model, padding_side="left", truncation_side="left")
        train_dataset = load_rows(options.train_data, tokenizer, options.max_prompt_length)
    except (OSError, ValueError) as err:
        fail(str(err), PROG)
    updates_per_rollout = options.prompts_per_rollout // options.prompts_per_update
    config = GRPOConfig(
        output_dir=options.output_dir,
        learning_rate=options.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.01,
        max_grad_norm=1.0,
        num_generations=options.num_generations,
        per_device_train_batch_size=options.per_device_batch_size,
        gradient_accumulation_steps=grad_accum,
        generation_batch_size=generation_batch,
        max_completion_length=options.max_completion_length,
        temperature=options.temperature,
        top_p=1.0,
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type="dapo",
        scale_rewards="group",
        num_train_epochs=options.epochs,
        max_steps=options.max_steps,
        gradient_checkpointing=True,
        bf16=on_gpu,
        use_cpu=not on_gpu,
        seed=options.seed,
        logging_steps=options.logging_steps,
        save_strategy="steps" if options.save_every_rollouts else "no",
        save_steps=max(1, options.save_every_rollouts * updates_per_rollout),
        report_to="none",
        use_vllm=options.use_vllm,
        vllm_mode="colocate",
    )
    os.makedirs(options.output_dir, exist_ok=True)
    metrics = MetricsFile(os.path.join(options.output_dir, "metrics.jsonl"))
    if os.path.exists(metrics.path):
        os.remove(metrics.path)
    # Loaded here rather than by TRL, which picks the class from config.json's `architectures`
    # (absent from some exports); AutoModelForCausalLM goes by `model_type`. fp32 weights, as TRL
    # loads them by default and verl keeps them (bf16 autocast on GPUs).
    model = AutoModelForCausalLM.from_pretrained(options.model, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=make_reward_function(not options.last_number_fallback),
                          args=config, train_dataset=train_dataset, processing_class=tokenizer,
                          callbacks=[metrics])
    trainer.train()
    trainer.save_model(options.output_dir)
    if trainer.accelerator.is_main_process:
        print(f"saved {options.output_dir} ({trainer.state.global_step} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
