"""Evaluation: sampling diversity and accuracy."""
