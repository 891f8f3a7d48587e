"""LoRA Garage: `python app.py [--host H] [--port P] [--home DIR] [--auth USER[:PASSWORD]] [--allow-dir DIR]`.

Installed (pip install .), the `lora-garage` command is `console` below: the app with these flags, or with a
command first (`lora-garage train ...`) the CLI that `python -m core` is."""

import argparse
import os
import sys
from core.__main__ import COMMANDS
from core.__main__ import main as cli_main
from core.errors import GarageError
from core.runs import access


def console(argv=None) -> int:
    """The `lora-garage` console command: `lora-garage COMMAND ...` runs the CLI, anything else the app."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return cli_main(argv, prog="lora-garage")
    return main(argv, prog="lora-garage")


def main(argv=None, prog: str | None = None) -> int:
    commands = "\n".join(f"  {name:<9} {text}" for name, text in COMMANDS.items())
    p = argparse.ArgumentParser(prog=prog, description="LoRA Garage web app", formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"headless commands ({prog or 'python -m core'} COMMAND --help for each):\n{commands}")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--home", help="app home folder (default: $LORA_GARAGE_HOME or ~/lora-garage)")
    p.add_argument("--auth", metavar="USER[:PASSWORD]", help="login; required when --host is not a loopback address. "
                   f"Without :PASSWORD the password comes from --auth-file or ${access.PASSWORD_ENV}")
    p.add_argument("--auth-file", metavar="FILE", help="a file whose first line is the --auth password")
    p.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                   help="a folder a shared app may read datasets and models from (repeatable); beyond loopback, "
                        "paths outside the app home and these folders are refused")
    args = p.parse_args(argv)
    try:
        auth = access.parse_auth(args.auth, args.auth_file)
        os.environ.pop(access.PASSWORD_ENV, None)  # read once; the training children need not carry it
        shared = args.host not in access.LOOPBACK
        if shared and not auth:
            print(f"refusing to listen on {args.host} without --auth USER:PASSWORD: anyone on your network could "
                  "start jobs and read your data", file=sys.stderr)
            return 2
        if args.home:
            os.environ["LORA_GARAGE_HOME"] = os.path.abspath(args.home)
        if shared or args.allow_dir:
            access.confine(args.allow_dir, shared=shared)
    except GarageError as e:
        print(f"error: {e.message}\nfix:   {e.hint}", file=sys.stderr)
        return 2
    from ui.layout import launch  # heavy

    launch(host=args.host, port=args.port, auth=auth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
