"""A Linux Python that looks like Windows where it matters to LoRA Garage: tests/test_portable.py puts this folder on
PYTHONPATH with LORA_GARAGE_NOPOSIX=1, so it loads at start in the test process and in every child the runner
starts (they inherit the environment).

- `fcntl` cannot be imported (filelock, the stand-in for msvcrt, is imported first and keeps its own reference);
- os.killpg, os.setsid and the other process-group calls, and os.pwrite, are gone (Windows has none of them);
- Popen refuses start_new_session, process_group, pass_fds and preexec_fn (Windows' Popen has none of them) and
  accepts creationflags (which Linux' Popen refuses) by dropping them;
- core.runs.portable is imported with os.name == "nt", so it takes its Windows branches; os.kill with
  CTRL_BREAK_EVENT is printed and goes nowhere, as it does for a Windows child with no console of its own.
Nothing happens without LORA_GARAGE_NOPOSIX=1.
"""

import os

if os.environ.get("LORA_GARAGE_NOPOSIX") == "1":
    import json  # noqa: F401 - imported before os.name changes below, so they take their POSIX branches
    import logging  # noqa: F401
    import pathlib  # noqa: F401
    import signal
    import subprocess
    import sys
    import threading  # noqa: F401
    import time  # noqa: F401

    import filelock  # noqa: F401 - its own lock call is bound now; nothing imported later can get fcntl
    import psutil  # noqa: F401

    sys.modules["fcntl"] = None  # `import fcntl` now raises ImportError
    for name in ("killpg", "setsid", "getpgid", "setpgid", "setpgrp", "getpgrp", "getsid", "pwrite"):
        if hasattr(os, name):
            delattr(os, name)

    _Popen = subprocess.Popen

    class WindowsLikePopen(_Popen):
        def __init__(self, args, *a, **kw):
            for key in ("start_new_session", "process_group", "pass_fds", "preexec_fn"):
                if kw.get(key):
                    raise ValueError(f"Popen({key}=...) does not exist on Windows (LoRA Garage's no-POSIX test)")
            kw.pop("creationflags", None)
            super().__init__(args, *a, **kw)

    subprocess.Popen = WindowsLikePopen
    subprocess.CREATE_NEW_PROCESS_GROUP = 0x200

    class _CtrlBreak(int):
        pass

    signal.CTRL_BREAK_EVENT = _CtrlBreak(1)
    _kill = os.kill

    def kill(pid, sig):
        if isinstance(sig, _CtrlBreak):
            print(f"no-POSIX test: CTRL_BREAK_EVENT to pid {pid} (goes nowhere here)", file=sys.stderr, flush=True)
            return
        _kill(pid, sig)

    os.kill = kill

    real_name = os.name
    os.name = "nt"
    try:
        import core.runs.portable  # noqa: F401 - decides WINDOWS once, at import
    finally:
        os.name = real_name
