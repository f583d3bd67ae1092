"""Data for the training loop."""
