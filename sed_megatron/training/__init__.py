"""Training on Megatron-LM's loop: arguments, forward step, metrics."""
