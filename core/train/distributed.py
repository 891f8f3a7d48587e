"""Several devices: the plan (how many processes, which strategy, the per-rank grad_accum that keeps the global
batch), the launch command (PyTorch's own launcher, torch.distributed.run, never a home-made scheduler), what a
rank is (rank 0 alone writes the run folder), and reading the launcher's verdict when a rank dies.

One device trains in the child process itself, as always. For several, the child becomes the supervisor: it
holds the training lock and the run's status, tokenises the data once, starts the launcher with an argument list,
forwards Stop to rank 0 (which tells the others at a step boundary), and when a rank dies names it.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import json
import shlex
from core.config import parse_devices
from core.train import allocator
from core.errors import ConfigError
from core import hardware
from core import models
from core.errors import GarageError
from core.estimate import vram

NODES_ENV = "LORA_GARAGE_NODES"        # "N,K,HOST:PORT": this run is node K of N (python -m core train --nnodes)
RANK_ENV = "LORA_GARAGE_RANK"          # set for the processes the launcher starts (they are ranks, not supervisors)
RESUME_ENV = "LORA_GARAGE_RESUME_FROM"  # the checkpoint the supervisor chose, for every rank
PREPARED_FILE = "prepared.pkl"          # the tokenised data, written once by the supervisor into ranks/


@dataclass
class Plan:
    world_size: int
    strategy: str                     # single | ddp | fsdp
    backend: str                      # nccl (GPUs) | gloo (CPU processes)
    gpus: list[int] | None            # CUDA_VISIBLE_DEVICES for the ranks; None on the CPU
    grad_accum: int                   # per rank: keeps batch_size x grad_accum x world_size as configured
    effective_batch: int
    batch_size: int = 1               # per process and micro-step, as configured
    notes: list[str] = field(default_factory=list)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        where = (f"{self.world_size} GPU{'s' if self.world_size > 1 else ''} ({','.join(map(str, self.gpus))})"
                 if self.gpus else f"{self.world_size} CPU process{'es' if self.world_size > 1 else ''}")
        return (f"{where}, strategy {self.strategy}, effective batch {self.effective_batch} = batch "
                f"{self.batch_size} x grad_accum {self.grad_accum} x {self.world_size}")


def plan(cfg, gpu_count: int, fits_one=None, fits_sharded=None, nnodes: int = 1) -> Plan:
    """The plan for cfg on a machine with gpu_count visible GPUs (each of `nnodes` machines alike). fits_one /
    fits_sharded(world) say whether the per-GPU estimate fits one card with DDP / with FSDP over `world` cards
    (None: unknown, assume it fits)."""
    t, method = cfg.train, cfg.quant.method
    want = parse_devices(t.devices)
    notes: list[str] = []
    if want == "auto":
        gpus = list(range(gpu_count)) if gpu_count else None
        world = max(gpu_count, 1)
    elif isinstance(want, list):
        if not gpu_count:
            raise ConfigError("train.devices", f"GPU indices {want} given, but this machine has no NVIDIA GPU",
                              "use auto, or a count (2 = two CPU processes)")
        bad = [i for i in want if i >= gpu_count]
        if bad:
            raise ConfigError("train.devices", f"GPU {bad[0]} does not exist: this machine has {gpu_count} "
                              f"(0..{gpu_count - 1})", f"use indices below {gpu_count}, or auto")
        gpus, world = want, len(want)
    else:
        if gpu_count and want > gpu_count:
            raise ConfigError("train.devices", f"{want} GPUs asked for, this machine has {gpu_count}",
                              f"use {gpu_count} or fewer, or auto")
        gpus = list(range(want)) if gpu_count else None
        world = want
    world *= max(nnodes, 1)
    strategy = t.strategy
    if strategy == "single" and world > 1:
        raise ConfigError("train.strategy", f"single runs on one device, but train.devices gives {world}",
                          "set train.devices=1, or train.strategy=auto / ddp / fsdp")
    if strategy == "fsdp" and not gpus:
        raise ConfigError("train.strategy", "fsdp shards the model across GPUs; this run has none",
                          "use train.strategy=ddp (or auto) on the CPU")
    if strategy == "auto":
        if world == 1:
            strategy = "single"
        elif (gpus and method == "lora" and fits_one is not None and not fits_one
              and (fits_sharded is None or fits_sharded(world))):
            strategy = "fsdp"
            notes.append(f"the 16-bit LoRA does not fit one GPU but fits sharded over {world}: FSDP (full shard)")
        else:
            strategy = "ddp"
    elif strategy in ("ddp", "fsdp") and world == 1:
        notes.append(f"train.strategy={strategy} with one device trains as single")
        strategy = "single"
    if strategy == "fsdp" and method in ("qlora", "8bit"):
        notes.append("experimental: 4-/8-bit bases under FSDP2 are known to give wrong outputs in current "
                     "bitsandbytes releases; you set train.strategy=fsdp explicitly")
    accum = t.grad_accum
    if world > 1:
        accum = max(1, round(t.grad_accum / world))
        if accum * world != t.grad_accum:
            notes.append(f"train.grad_accum {t.grad_accum} cannot be divided evenly over {world} processes: "
                         f"{accum} per process, so the effective batch is {t.batch_size * accum * world} instead of "
                         f"{t.batch_size * t.grad_accum}")
        else:
            notes.append(f"train.grad_accum {t.grad_accum} -> {accum} per process over {world}: the effective batch "
                         f"stays {t.batch_size * t.grad_accum}")
    return Plan(world_size=world, strategy=strategy, backend="nccl" if gpus else "gloo", gpus=gpus,
                grad_accum=accum, effective_batch=t.batch_size * accum * world, batch_size=t.batch_size, notes=notes)


def machine_plan(cfg, reading: hardware.HardwareReading | None = None, shape=None) -> Plan:
    """plan() for this machine (its visible GPUs, read now unless `reading` is given), with the fits checks that
    let auto shard a 16-bit LoRA no single card holds (on the model's `shape`, read from its config unless given).
    The one plan of a run: the training child makes it once, the VRAM panel shows it."""
    reading = reading or hardware.read()
    nodes = nodes_from_env()
    fits_one = fits_sharded = None
    if len(reading.gpus) > 1 and cfg.train.strategy == "auto" and cfg.quant.method == "lora":
        fits_one, fits_sharded = _fits(cfg, reading.gpus, shape)
    return plan(cfg, len(reading.gpus), fits_one, fits_sharded, nnodes=nodes[0] if nodes else 1)


def _fits(cfg, gpus, shape=None) -> tuple:
    """Does a DDP replica fit the smallest card, and does FSDP over w cards (from the model's config alone)?"""
    if shape is None:
        try:
            shape = vram.shape_from_config(models.read_config(cfg.model.source))
        except GarageError:
            return None, None  # unknown: auto keeps DDP, and the run's own estimate.json says how it went
    est = vram.estimate(shape, vram.settings_from_config(cfg, device="cuda"))
    card = min(g.total for g in gpus)
    return (vram.verdict(vram.per_gpu(est, "ddp", len(gpus)), card).fits,
            lambda w: vram.verdict(vram.per_gpu(est, "fsdp", w), card).fits)


def nodes_from_env() -> tuple[int, int, str] | None:
    """(nnodes, node_rank, rendezvous HOST:PORT) when this run is one node of several, else None."""
    text = os.environ.get(NODES_ENV)
    if not text:
        return None
    n, k, rdzv = text.split(",", 2)
    return int(n), int(k), rdzv


def node_commands(argv: list[str], nnodes: int, rdzv: str) -> list[str]:
    """The command to type on each machine: the same train command with its --node-rank."""

    base = [a for a in argv]
    return [shlex.join(["python", "-m", "core", "train", *base, "--nnodes", str(nnodes), "--node-rank", str(k),
                        "--rdzv", rdzv]) for k in range(nnodes)]


# ---------------------------------------------------------------- ranks

def rank() -> int:
    """This process's global rank (0 outside a launched group)."""
    return int(os.environ.get("RANK", "0"))


def is_rank_process() -> bool:
    return os.environ.get(RANK_ENV) == "1"


def is_main() -> bool:
    return rank() == 0


def ranks_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "ranks"


def record_plan(run_dir: Path, p: Plan) -> None:
    """ranks/plan.json: the world the run trained with, for a later resume to compare."""

    ranks_dir(run_dir).mkdir(exist_ok=True)
    (ranks_dir(run_dir) / "plan.json").write_text(json.dumps(
        {"world_size": p.world_size, "strategy": p.strategy, "effective_batch": p.effective_batch}))


def pid_file(run_dir: Path, r: int) -> Path:
    return ranks_dir(run_dir) / f"rank{r}.pid"


def stop_agreed(requested: bool) -> bool:
    """One decision for all ranks at a step boundary: stop when any rank was asked to (rank 0 is)."""
    import torch  # heavy
    import torch.distributed as dist  # heavy

    if not (dist.is_available() and dist.is_initialized()):
        return requested
    flag = torch.tensor([1 if requested else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def barrier() -> None:
    import torch.distributed as dist  # heavy

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather(obj) -> list | None:
    """Every rank's obj on rank 0 (None elsewhere); [obj] without a group."""
    import torch.distributed as dist  # heavy

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


# ---------------------------------------------------------------- the launcher

def launch_command(run_dir: Path, p: Plan, nnodes: int = 1, node_rank: int = 0, rdzv: str | None = None) -> list[str]:
    """torch.distributed.run for this run: N processes per node, no restarts (a dying rank ends the run), per-rank
    logs under ranks/ (and teed, prefixed with their rank, into train.log)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--max-restarts", "0",
           "--nproc-per-node", str(p.world_size // max(nnodes, 1)),
           "--log-dir", str(ranks_dir(run_dir) / "logs"), "--redirects", "3", "--tee", "3"]
    if nnodes > 1:  # a static group over several machines: node 0's address is the rendezvous (c10d store)
        host, _, port = (rdzv or "127.0.0.1:29500").rpartition(":")
        cmd += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--master-addr", host, "--master-port", port]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "core", "train", "--run-dir", str(run_dir)]


def rank_env(p: Plan) -> dict:
    """The ranks' environment: marked as ranks, without the lock, on the plan's GPUs."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{RANK_ENV: "1"}, **allocator.rank_preload())
    env.pop("LORA_GARAGE_LOCK_FD", None)  # the supervisor holds the lock; ranks never take it
    if p.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, p.gpus))
        if p.world_size > 1 and nccl_p2p_broken():
            env.setdefault("NCCL_P2P_DISABLE", "1")
            env.setdefault("NCCL_IB_DISABLE", "1")
    return env


NCCL_NOTE = ("NCCL peer-to-peer is off (NCCL_P2P_DISABLE=1, NCCL_IB_DISABLE=1): RTX 40xx cards with drivers before "
             "550.40.07 hang in peer-to-peer transfers (accelerate's own check); update the driver to lift it")


def nccl_p2p_broken() -> bool:
    """accelerate's check (nvidia-smi: RTX 40xx with a driver older than 550.40.07), the one `accelerate launch` uses."""
    from accelerate.utils.environment import check_cuda_p2p_ib_support  # heavy

    return not check_cuda_p2p_ib_support()


_ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def failed_rank(log_text: str) -> tuple[int, int] | None:
    """(rank, exit code) of the first failure the launcher reported in its summary, or None."""
    m = _ROOT_CAUSE.search(log_text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def rank_log_tail(run_dir: Path, r: int, lines: int = 15) -> str:
    """The end of rank r's own log (the launcher's --log-dir layout: <id>/attempt_0/<local rank>/stderr.log)."""
    found = sorted((ranks_dir(run_dir) / "logs").glob(f"*/attempt_*/{r}/stderr.log"), key=lambda p: p.stat().st_mtime)
    if not found:
        return ""
    return "\n".join(found[-1].read_text(errors="replace").splitlines()[-lines:])
