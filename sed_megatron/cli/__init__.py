"""Command-line entry points: each parses its arguments and calls one function of the package.

`tools/<name>.py` (the documented commands) and the `sed-*` console scripts call these
`main(argv=None) -> int`. Bad input ends as argparse does: `prog: error: message` on stderr
and exit status 2.
"""

import sys


def fail(prog, message):
    """One line on stderr, as argparse reports a usage error; the exit status to return (2)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2
