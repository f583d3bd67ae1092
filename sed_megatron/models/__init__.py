"""Model builders for the training loop."""
