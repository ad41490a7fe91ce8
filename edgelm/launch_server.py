"""`python -m edgelm.launch_server` — SGLang's command, SGLang's flags."""

from __future__ import annotations

import sys

from edgelm.server_args import prepare_server_args


def main(argv: list[str] | None = None) -> None:
    from edgelm.entrypoints.http_server import launch_server

    server_args = prepare_server_args(argv)
    try:
        launch_server(server_args)
    except RuntimeError as exc:  # start-up refusals: one clear line, no traceback
        print(f"edgelm: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
