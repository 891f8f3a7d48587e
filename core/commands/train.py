"""`python -m core train`: train a LoRA / QLoRA adapter headless, through the same code as the UI.

  python -m core train --preset cpu-demo                        # a new run, in the foreground
  python -m core train --config my.yaml --set lora.r=32 --detach  # a new run in the background; prints its id
  python -m core train --run-dir DIR                            # the child the runner spawns (DIR/config.yaml)
  python -m core train --objective dpo --dataset pairs.jsonl [--from-run RUN]   # preference tuning (DPO / ORPO)

Settings are layered: defaults, then --preset, then --config FILE (only the keys it sets), then --model,
--dataset, --method, --max-steps, --objective, --from-run, then each --set section.key=value. With --from-run the
new run trains that run's adapter further, on its base model and with its LoRA shape.
"""

from __future__ import annotations

import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import yaml

import os
from core import events as ev
from core.runs import procs
from core.runs import resolve as run_files
from core.config import METHODS, OBJECTIVES, RunConfig, apply_overrides, from_dict
from core.errors import ConfigError, GarageError
from core import presets
from core.runs import folder as runs
from core.runs import runner
from core.train import allocator
from core.train import child as training
from core.train import distributed


def add_arguments(p) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="a YAML config (any subset of the sections)")
    p.add_argument("--preset", metavar="NAME", help="a preset from presets/ or your own (python -m core train --preset cpu-demo)")
    p.add_argument("--model", metavar="SOURCE", help="model.source: builtin:smollm2-135m, a hub id, a folder, or a .gguf file")
    p.add_argument("--dataset", metavar="SOURCE", help="data.source: a file, a folder, a hub id, or builtin:demo-identity")
    p.add_argument("--method", choices=METHODS, help="quant.method: lora (16-bit base), qlora (4-bit), 8bit")
    p.add_argument("--max-steps", type=int, metavar="N", help="train.max_steps")
    p.add_argument("--objective", choices=OBJECTIVES, help="train.objective: sft, dpo / orpo on chosen / rejected pairs, or grpo on prompts scored by rewards")
    p.add_argument("--from-run", metavar="RUN", help="train.from_run: continue from this completed run's adapter "
                                                     "(a run id or latest)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. --set lora.r=32 (repeatable)")
    p.add_argument("--run-dir", metavar="DIR", help="train the run in DIR (its config.yaml); what the runner spawns")
    p.add_argument("--detach", action="store_true", help="start in the background via the runner and print the run id")
    p.add_argument("--nnodes", type=int, default=1, metavar="N",
                   help="train on N machines (torchrun's static rendezvous); without --node-rank, print the command "
                        "to type on each machine")
    p.add_argument("--node-rank", type=int, default=None, metavar="K", help="this machine's place, 0..N-1 (0 hosts "
                   "the rendezvous and writes the run's events, checkpoints and adapter)")
    p.add_argument("--rdzv", metavar="HOST:PORT", help="the address of machine 0, reachable from every machine")


def run(args) -> int:
    if args.run_dir:
        return _child(args)
    cfg = build_config(args)
    if args.nnodes > 1 or args.node_rank is not None:
        return _nodes(args, cfg)
    if args.detach:
        print(runner.start(cfg))
        return 0
    return _foreground(cfg)


def _nodes(args, cfg: RunConfig) -> int:
    """Several machines: print each machine's command, or train as machine --node-rank (in the foreground)."""

    if args.nnodes < 2:
        raise ConfigError("--nnodes", f"--node-rank needs --nnodes 2 or more (got {args.nnodes})", "add --nnodes N")
    if not args.rdzv or ":" not in args.rdzv:
        raise ConfigError("--rdzv", "several machines need the address of machine 0 as HOST:PORT",
                          "add --rdzv 192.168.1.10:29500 (a port free on machine 0)")
    if args.node_rank is None:
        runner.admit(cfg)  # a typo is caught here, before the user types the command on every machine
        argv = [a for a in sys.argv[1:] if a != "train"]
        keep, skip = [], False
        for a in argv:  # the node flags are written anew for each machine
            if skip:
                skip = False
                continue
            if a in ("--nnodes", "--rdzv", "--node-rank"):
                skip = True
                continue
            if a.startswith(("--nnodes=", "--rdzv=", "--node-rank=")):
                continue
            keep.append(a)
        print("Run one of these on each machine (machine 0 first; every machine needs the model and the data):")
        for line in distributed.node_commands(keep, args.nnodes, args.rdzv):
            print(f"  {line}")
        return 0
    if not 0 <= args.node_rank < args.nnodes:
        raise ConfigError("--node-rank", f"{args.node_rank} is outside 0..{args.nnodes - 1}", "use 0 on machine 0, 1 ...")
    if args.detach:
        raise ConfigError("--detach", "a machine of a several-machine run trains in the foreground",
                          "drop --detach (use nohup or tmux to keep it running)")
    os.environ[distributed.NODES_ENV] = f"{args.nnodes},{args.node_rank},{args.rdzv}"
    return _foreground(cfg)


def build_config(args) -> RunConfig:
    cfg = RunConfig()
    if args.preset:
        cfg = presets.apply(args.preset, cfg)
    if args.config:
        cfg = _overlay_file(cfg, Path(args.config))
    d = cfg.to_dict()
    flags = {("model", "source"): args.model, ("data", "source"): args.dataset, ("quant", "method"): args.method,
             ("train", "max_steps"): args.max_steps, ("train", "objective"): args.objective,
             ("train", "from_run"): args.from_run}
    for (section, name), value in flags.items():
        if value is not None:  # set directly: a path or hub id must not go through YAML parsing
            d[section][name] = value
    cfg = apply_overrides(from_dict(d), args.set)  # --set last, so it wins
    return runner.pin_source_run(cfg, model_given=args.model is not None or any(s.startswith("model.source=")
                                                                                for s in args.set))


def _overlay_file(cfg: RunConfig, path: Path) -> RunConfig:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError("--config", f"file not found: {path}", "check the path")
    except yaml.YAMLError as e:
        raise ConfigError("--config", f"{path} is not valid YAML: {e}", "fix the YAML syntax at the line shown")
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path} must be a mapping of sections", "see presets/cpu-demo.yaml")
    d = cfg.to_dict()
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(d.get(section), dict):
            d[section].update(values)
        else:
            d[section] = values  # from_dict reports unknown sections and bad types, naming them
    return from_dict(d)


def _child(args) -> int:
    """The process the runner spawns. The folder must be a run under the runs folder: no path escapes."""

    given = [name for name in ("config", "preset", "model", "dataset", "method", "max_steps") if getattr(args, name)]
    if given or args.set or args.detach:
        raise ConfigError("--run-dir", f"takes every setting from DIR/config.yaml; drop --{given[0] if given else 'set'}",
                          "edit a copy of the config and start a new run instead")
    wanted = Path(args.run_dir).expanduser().resolve()
    run_dir = runs.get(wanted.name)
    if run_dir != wanted:
        raise ConfigError("--run-dir", f"{args.run_dir} is not a run folder under {run_dir.parent}",
                          "pass a folder created by LoRA Garage (python -m core runs lists them)")
    try:
        cfg = runs.load_config(run_dir)
    except GarageError:
        cfg = None  # training.main reads it again, and reports the problem in the run's status
    if cfg is not None:
        allocator.prepare(cfg, _argv())
    return training.main(run_dir)


def _argv() -> list[str] | None:
    """This process's command line to start again with (core.train.allocator), when it is the CLI's `train`."""
    return sys.argv[1:] if sys.argv[1:2] == ["train"] else None


# a failed run whose error is one of these was the user's to fix (exit 2, as for any GarageError); others are 1
USER_ERROR_KINDS = ("config", "model", "dataset", "disk", "oom", "nan", "busy")


def _foreground(cfg: RunConfig) -> int:
    """Create the run and train it in this process; output goes to the terminal and to train.log. A failure shows
    as its `error:` / `fix:` lines; its traceback goes to train.log only."""

    runner.admit(cfg)
    allocator.prepare(cfg, _argv())  # may start this process again, with a leaner allocator
    lock = runner.acquire_lock("(starting)")  # before creating the folder: a busy machine leaves no empty run
    run_dir = runs.create(cfg)
    runs.write_status(run_dir, launched_by=procs.LAUNCHED_BY_CLI)
    print(f"run {run_dir.name}\n  folder: {run_dir}", flush=True)
    t0 = time.time()
    with _Tee(run_dir / "train.log") as tee, _tracebacks_to(tee.fh):
        code = training.main(run_dir, lock=lock)
    _summary(run_dir, time.time() - t0)
    error = runs.read_status(run_dir, reconcile=False).get("error") or {}
    if code == 1 and error.get("kind") in USER_ERROR_KINDS:
        return 2
    return code


@contextmanager
def _tracebacks_to(fh):
    """training.main prints the traceback of a failure with traceback.print_exc() on stderr, which the terminal
    shares here; send it to train.log alone (the error and fix lines it prints next still reach both)."""
    saved = traceback.print_exc

    def to_log(limit=None, file=None, chain=True):
        saved(limit=limit, file=fh, chain=chain)

    traceback.print_exc = to_log
    try:
        yield
    finally:
        traceback.print_exc = saved


def _summary(run_dir: Path, seconds: float) -> None:
    st = runs.read_status(run_dir, reconcile=False)
    events, _ = ev.read(run_dir)
    last = ev.last_metric(events, ev.LOSS)
    loss = f", final loss {last:.4f}" if last is not None else ""
    print(f"{st.get('state')} in {seconds:.0f} s after {st.get('step')} steps{loss}")
    if run_files.has_adapter(run_dir):
        print(f"  adapter: {run_dir / 'adapter'}")


class _Tee:
    """Copy this process's stdout and stderr into train.log too, as the runner does for a background child."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.fh = open(self.path, "a", encoding="utf-8", buffering=1)
        self.saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Both(sys.stdout, self.fh), _Both(sys.stderr, self.fh)
        return self

    def __exit__(self, *exc):
        sys.stdout, sys.stderr = self.saved
        self.fh.close()


class _Both:
    def __init__(self, a, b):
        self.a, self.b = a, b

    def write(self, s):
        self.a.write(s)
        self.b.write(s)
        return len(s)

    def flush(self):
        self.a.flush()
        self.b.flush()

    def isatty(self):
        return False

    def __getattr__(self, name):
        return getattr(self.a, name)
