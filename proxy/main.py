"""The `connect-proxy` console script and `python -m proxy`: argv[0] picks the command.

`connect-proxy [flags]` is the proxy (`consul connect proxy`); `dev-agent`, `envoy`, `exec`,
`peering`, `demo` and `version` are the other commands. Each command module owns its flags,
output and exit codes; this module only dispatches.

Rule 1: nothing imports this module. Each command is imported only when it is run, so
starting the proxy (and each of its -workers processes) does not pay for the dev agent's
web framework or Envoy's bootstrap code. These function-local imports point down only;
tests/test_imports.py checks that no import, local or not, forms a cycle.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from proxy import __version__


def _dev_agent(args: Sequence[str]) -> int:
    from proxy.devagent.command import dev_agent_main

    return dev_agent_main(args)


def _envoy(args: Sequence[str]) -> int:
    from proxy.envoy.command import envoy_main

    return envoy_main(args, os.environ)


def _exec(args: Sequence[str]) -> int:
    from proxy.rexec.command import exec_main

    return exec_main(args, os.environ)


def _peering(args: Sequence[str]) -> int:
    from proxy.peering.command import peering_main

    return peering_main(args, os.environ)


def _demo(args: Sequence[str]) -> int:
    from proxy.demo import demo_main
    from proxy.demo_peering import peering_walkthrough

    return demo_main(args, peering_walkthrough)


def _version(args: Sequence[str]) -> int:
    print(f"connect-proxy {__version__}")
    return 0


def _proxy(args: Sequence[str]) -> int:
    from proxy.command import proxy_main

    return proxy_main(args, os.environ)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command named by `argv` (default: `sys.argv[1:]`); returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "dev-agent": _dev_agent,
        "envoy": _envoy,
        "exec": _exec,
        "peering": _peering,
        "demo": _demo,
        "version": _version,
        "-version": _version,
        "--version": _version,
    }
    if args and args[0] in commands:
        return commands[args[0]](args[1:])
    return _proxy(args)
