"""The ``pagedserve`` command: start tritonserver with the pagedserve backend, or prepare it.

    pagedserve serve --model-repository DIR [any other tritonserver option]
                                      # runs tritonserver and restarts what fails
    pagedserve backend-dir            # prepares and prints the --backend-directory to use
    pagedserve install-backend DIR    # copies model.py to DIR/pagedserve/ (Docker images)
    pagedserve env                    # prints the environment lines tritonserver needs
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from pagedserve.serving import launcher


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run tritonserver with the pagedserve backend, restarting what fails; every "
        "option is passed through",
        add_help=False,
    )
    serve.add_argument("server_args", nargs="*", help="tritonserver options")
    sub.add_parser("backend-dir", help="prepare the backend directory and print its path")
    install = sub.add_parser("install-backend", help="copy model.py to DIR/pagedserve/model.py")
    install.add_argument("backends_dir", type=Path)
    sub.add_parser("env", help="print the LD_LIBRARY_PATH and PATH tritonserver needs")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # argparse cannot pass unknown --options through, so serve's are taken as they come.
        if argv[:1] == ["serve"] and not {"-h", "--help"} & set(argv[1:]):
            return launcher.serve(argv[1:])
        args = _parser().parse_args(argv)
        if args.command == "backend-dir":
            print(launcher.prepare_backend_dir(launcher.find_tritonserver()))
        elif args.command == "install-backend":
            print(launcher.install_backend(args.backends_dir))
        elif args.command == "env":
            install = launcher.find_tritonserver()
            env = launcher.server_environment(install)
            print(f"export LD_LIBRARY_PATH={shlex.quote(env['LD_LIBRARY_PATH'])}")
            print(f"export PATH={shlex.quote(env['PATH'])}")
            print(f"# tritonserver: {install.binary} ({install.origin})")
    except launcher.LauncherError as e:
        print(f"pagedserve: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
