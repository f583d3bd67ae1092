"""Helpers shared by the test suite and the tools that check numerics."""
