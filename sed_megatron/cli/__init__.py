"""Command-line entry points: each module parses its arguments and calls one package function.

`tools/<name>.py` and the console scripts of setup.py run `sed_megatron.cli.<name>.main`."""
