"""Command-line entry points: each parses its arguments and calls one function of the package."""
