"""The `edgelm` command: `edgelm serve [flags]` (same flags as launch_server) and `edgelm doctor`."""

from __future__ import annotations

import sys

USAGE = """usage: edgelm <command> [args]

commands:
  serve    start the OpenAI-compatible server (flags as python -m edgelm.launch_server; --help)
  doctor   report what this machine can run (platform, GPU, libraries, backends)
"""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from edgelm.launch_server import main as serve

        serve(rest)
    elif command == "doctor":
        from edgelm.check_env import main as doctor

        sys.exit(doctor(rest) or 0)
    else:
        print(f"edgelm: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
