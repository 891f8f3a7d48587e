"""The training child's start-up timeline: each phase from the runner's spawn to the first metrics event, written
as a `startup` event (core.events) when it ends. The phases are back to back: each begins where the one before
ended, so they add up to the whole wait for the first chart point.

    timeline = Timeline.from_env(events)    # in the child's main: spawn (when the runner set SPAWNED_AT_ENV)
    timeline.mark("imports")                # the phase that just ended, from the previous mark to now
    ...
    timeline.mark("first step")             # at the first metrics event; later marks are ignored

Light on purpose (no torch): the runner imports SPAWNED_AT_ENV from here.
"""

from __future__ import annotations

import os
import sys
import time

import core

SPAWNED_AT_ENV = "LORA_GARAGE_SPAWNED_AT"  # unix seconds, set by core.runs.runner just before it spawns the child


class Timeline:
    """Writes one startup event per phase. `events` None: a timeline that records nothing (ranks of a
    multi-process run, whose rank 0 child is not the process the runner spawned)."""

    def __init__(self, events, started_at: float, spawned_at: float | None = None, started_cpu: float = 0.0):
        self.events, self.last, self.last_cpu, self.done = events, started_at, started_cpu, events is None
        if events is not None and spawned_at is not None:
            events.startup("spawn", spawned_at, max(started_at - spawned_at, 0.0), started_cpu)

    @classmethod
    def from_env(cls, events) -> "Timeline":
        """Starts at core.STARTED_AT (when this process began importing core); the spawn phase comes from the
        runner's SPAWNED_AT_ENV, which is taken out of the environment so no grandchild reads it as its own."""
        raw = os.environ.pop(SPAWNED_AT_ENV, None)
        spawned = None
        if raw is not None:
            try:
                spawned = float(raw)
            except ValueError:
                print(f"WARNING: {SPAWNED_AT_ENV}={raw!r} is not a time in seconds: the start-up timeline has no "
                      f"spawn phase", file=sys.stderr, flush=True)
        return cls(events, core.STARTED_AT, spawned, core.STARTED_CPU)

    @classmethod
    def off(cls) -> "Timeline":
        return cls(None, 0.0)

    def mark(self, phase: str, detail: str | None = None, now: float | None = None) -> None:
        """Phase `phase` ended now: it lasted from the previous mark. After "first step", marks are ignored (a
        trainer rebuilt by the out-of-memory recovery is not start-up)."""
        if self.done:
            return
        now = time.time() if now is None else now
        cpu = time.process_time()  # every thread of this process: torch's intra-op threads included
        self.events.startup(phase, self.last, max(now - self.last, 0.0), max(cpu - self.last_cpu, 0.0), detail)
        self.last, self.last_cpu = now, cpu
        self.done = phase == "first step"
