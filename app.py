"""LoRA Garage: `python app.py [--host H] [--port P] [--home DIR] [--auth user:password]`."""

import argparse
import os
import sys


def main() -> int:
    p = argparse.ArgumentParser(description="LoRA Garage web app")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--home", help="app home folder (default: $LORA_GARAGE_HOME or ~/lora-garage)")
    p.add_argument("--auth", help="user:password; required when --host is not a loopback address")
    args = p.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.auth:
        print(f"refusing to listen on {args.host} without --auth user:password: anyone on your network could "
              "start jobs and read your data", file=sys.stderr)
        return 2
    if args.home:
        os.environ["LORA_GARAGE_HOME"] = os.path.abspath(args.home)
    from ui.layout import launch

    launch(host=args.host, port=args.port, auth=tuple(args.auth.split(":", 1)) if args.auth else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
