"""`python -m core serve`: one base model and its runs' adapters behind an OpenAI-compatible API.

The base is --base, else the base of the first --runs run, else that of the newest run with a final adapter, else
the built-in model. Runs trained on another base are refused by name (serve them with a second server on another
port). Loopback only unless an API key is set: the key comes from $LORA_GARAGE_API_KEY (or a hidden prompt), never
from the command line, where every user of the machine could read it in the process list.
"""

import getpass
import os
import sys

from core.errors import GarageError
from core.runs import folder as runs
from core.runs import resolve as run_files
from core.serve import API_KEY_ENV, Running, Server, check_exposure, snippet

BUILTIN = "builtin:smollm2-135m"


def add_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--runs", nargs="+", default=None, metavar="RUN",
                   help="serve only these runs (default: every run with a final adapter trained on the base)")
    p.add_argument("--base", default=None, metavar="SOURCE",
                   help="base model: builtin:smollm2-135m, a hub id or a folder (default: the runs' base)")
    p.add_argument("--quant", choices=["4bit"], default=None, help="load the base in 4-bit (less VRAM)")
    p.add_argument("--max-adapters", type=int, default=8, metavar="N",
                   help="adapters kept loaded at once; the least recently used leaves first (default 8)")
    p.add_argument("--max-queue", type=int, default=8, metavar="N",
                   help="requests waiting or being answered; more get 429 with Retry-After (default 8)")
    p.add_argument("--api-key", action="store_true",
                   help=f"require an API key (Authorization: Bearer KEY), read from ${API_KEY_ENV} or typed at a "
                        "hidden prompt; required beyond loopback")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")


def run(args) -> int:
    base, skipped = _choose_base(args.base, args.runs)
    key = _api_key(args.api_key, args.host)
    check_exposure(args.host, key)
    server = Server(base, args.runs, args.quant, args.max_adapters, args.max_queue, key, args.device)
    served, foreign = server.catalogue.runs()
    for run_id, trained_on in {**skipped, **foreign}.items():
        print(f"skipped run {run_id}: trained on {trained_on}, this server holds {base} "
              f"(serve it with: python -m core serve --runs {run_id} --port {args.port + 1})", file=sys.stderr)
    print(f"loading {base} (the first time can take a minute) ...", file=sys.stderr, flush=True)
    server.load()
    mem = server.memory()
    print(f"loaded on {server.session.device}: weights {mem['base_bytes'] / 2**20:.1f} MiB, "
          f"process resident {mem['rss_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    running = Running(server, args.host, args.port)
    print(f"serving {server.catalogue.name} and {len(served)} run(s) at {running.url}", file=sys.stderr)
    print(f"models: {', '.join([server.catalogue.name, *served])}", file=sys.stderr)
    print(snippet(running.url, served[0] if served else server.catalogue.name, key_env=key is not None),
          file=sys.stderr)
    print("Ctrl-C stops it.", file=sys.stderr, flush=True)
    running.uv.run()   # in this thread: uvicorn handles Ctrl-C / SIGTERM itself
    return 0


def _choose_base(base: str | None, only: list[str] | None) -> tuple[str, dict]:
    """The base to hold, and {run: its base} for the named runs that do not fit it (refused when named)."""
    if only:
        named = {r: runs.load_config(runs.get(r)).model.source for r in only}
        for r in only:
            runs.adapter_path(runs.get(r))   # a named run without a final adapter is an error, said now
        base = base or named[only[0]]
        wrong = {r: b for r, b in named.items() if not run_files.same_source(b, base)}
        if wrong:
            r, b = next(iter(wrong.items()))
            raise GarageError(f"run {r} was trained on {b}; this server holds {base}",
                              f"serve it with a second server: python -m core serve --runs {r} --port ANOTHER_PORT")
        return base, {}
    if base:
        return base, {}
    with_adapter = [r for r in runs.list_runs() if r.get("has_adapter")]   # newest first
    return (with_adapter[0]["model"] if with_adapter else BUILTIN), {}


def _api_key(wanted: bool, host: str) -> str | None:
    key = os.environ.get(API_KEY_ENV, "")
    if not wanted:
        if key:
            print(f"note: ${API_KEY_ENV} is set but --api-key is not given: no key is required", file=sys.stderr)
        return None
    if not key and sys.stdin.isatty():
        key = getpass.getpass("API key for this server: ")
    if not key:
        raise GarageError("--api-key needs a key", f"set {API_KEY_ENV} in the environment (not on the command line)")
    return key
