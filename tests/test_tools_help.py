"""Every command's --help shows its own options first: within the first 40 lines (one screen).

In-process (main(argv) with capsys, or the tools/*.py file run as __main__), not one process
per tool. The commands: every tools/*.py (shims over sed_megatron/cli, and the benchmarks) and
every console script of setup.py. A tool's own options are those its help lists besides -h and
the SED-SFT run options that the Megatron-based tools share with training (add_sed_arguments);
each must have its help entry within 40 lines. Training's own options are that SED-SFT group
(about 20, with Megatron-LM's ~900 behind --help-megatron): too many to describe in 40 lines,
so its usage lists them first, and each must appear there.
"""

import argparse
import importlib
import os
import re
import runpy
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools")
SCREEN = 40


def console_scripts():
    """{script name: "module:function"} from setup.py."""
    with open(os.path.join(REPO, "setup.py")) as f:
        return dict(re.findall(r'"([\w-]+) = ([\w.]+:\w+)"', f.read()))


def tool_files():
    return sorted(name[:-3] for name in os.listdir(TOOLS) if name.endswith(".py"))


def sed_options():
    from sed_megatron.training.arguments import add_sed_arguments

    return {option for action in add_sed_arguments(argparse.ArgumentParser())._actions
            for option in action.option_strings}


def help_text(capsys, monkeypatch, run):
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps to the terminal; the same width everywhere
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def entries(text):
    """{option: line number (1-based)} of the help entries, after the usage and description."""
    lines = text.splitlines()
    start = lines.index("options:")
    found = {}
    for number, line in enumerate(lines[start:], start + 1):
        match = re.match(r"^  (?:-\w, )?(--[\w-]+)", line)
        if match:
            found.setdefault(match.group(1), number)
    return found


def check_own_options_first(text, shared):
    own = {option: line for option, line in entries(text).items() if option not in shared | {"--help"}}
    assert own, "no options found in the help"
    late = {option: line for option, line in own.items() if line > SCREEN}
    assert not late, f"own options described after line {SCREEN}: {late}"


@pytest.mark.parametrize("name", tool_files())
def test_tool_help_shows_own_options_first(name, capsys, monkeypatch):
    path = os.path.join(TOOLS, f"{name}.py")
    monkeypatch.setattr(sys, "argv", [path, "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the shims prepend the repository
    text = help_text(capsys, monkeypatch, lambda: runpy.run_path(path, run_name="__main__"))
    assert text.startswith(f"usage: {name}.py")
    check_own_options_first(text, sed_options())


@pytest.mark.parametrize("script", sorted(console_scripts()))
def test_console_script_help_shows_own_options_first(script, capsys, monkeypatch):
    module, function = console_scripts()[script].split(":")
    main = getattr(importlib.import_module(module), function)
    text = help_text(capsys, monkeypatch, lambda: main(["--help"]))
    if module == "sed_megatron.train":  # its own options are the SED-SFT group: listed first in the usage
        head = "\n".join(text.splitlines()[:SCREEN])
        missing = [option for option in sed_options() if option.startswith("--") and option not in head]
        assert not missing, f"not within the first {SCREEN} lines: {missing}"
        assert "--help-megatron" in head and "--tensor-model-parallel-size" not in text
    else:
        check_own_options_first(text, sed_options())
        # the documented command is tools/<name>.py, a shim over the same main
        name = module.rsplit(".", 1)[1]
        with open(os.path.join(TOOLS, f"{name}.py")) as f:
            shim = f.read()
        assert f"from {module} import main" in shim
        assert f"tools/{name}.py " in shim.split("\n\n")[1]  # the shim keeps the documented command first
