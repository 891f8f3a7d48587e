"""LoRA Garage: `python app.py [--host H] [--port P] [--home DIR] [--auth USER[:PASSWORD]] [--allow-dir DIR]`."""

import argparse
import os
import sys
from core.errors import GarageError
from core.runs import access


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="LoRA Garage web app")
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
            access.confine(args.allow_dir)
    except GarageError as e:
        print(f"error: {e.message}\nfix:   {e.hint}", file=sys.stderr)
        return 2
    from ui.layout import launch  # heavy

    launch(host=args.host, port=args.port, auth=auth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
