"""Who may reach the app, and which files a shared app may read.

On this machine only (the default, 127.0.0.1) a path field is the feature: the user types the path of their own
file. Bound beyond loopback, the app is reachable by others, so it asks for a login (--auth) and confines dataset
and model paths to the app home, its uploads, and the folders the operator lists with --allow-dir. The app
process sets CONFINE_ENV / ALLOW_ENV; everything that turns a setting into a file path asks check_source().
"""

from __future__ import annotations

import os
from pathlib import Path

from core.errors import ConfigError
from core.paths import home

CONFINE_ENV = "LORA_GARAGE_CONFINE"        # "1": dataset / model paths must lie under the allowed folders
ALLOW_ENV = "LORA_GARAGE_ALLOW_DIRS"       # extra allowed folders, os.pathsep-separated
SHARED_ENV = "LORA_GARAGE_SHARED"          # "1": the app listens beyond loopback (no user code: rewards.file)
PASSWORD_ENV = "LORA_GARAGE_PASSWORD"      # the --auth password, kept out of the shell history and `ps`
LOOPBACK = ("127.0.0.1", "localhost", "::1")


# ---------------------------------------------------------------- --auth

def parse_auth(value: str | None, password_file: str | None = None, environ=None) -> tuple[str, str] | None:
    """--auth USER:PASSWORD, or --auth USER with the password from --auth-file or $LORA_GARAGE_PASSWORD.
    -> (user, password) or None when no login is asked for. ConfigError for anything nobody could log in with."""
    environ = os.environ if environ is None else environ
    if value is None:
        if password_file:
            raise ConfigError("--auth-file", "given without --auth USER", "add --auth USER (the login name)")
        return None
    user, colon, password = value.partition(":")
    user = user.strip()
    if not user:
        raise ConfigError("--auth", "the user name is empty", "use --auth USER:PASSWORD, or --auth USER with "
                          f"the password in ${PASSWORD_ENV} or a file given with --auth-file")
    if colon and password_file:
        raise ConfigError("--auth", "a password on the command line and --auth-file at once",
                          "give only --auth USER together with --auth-file FILE")
    if not colon:
        if password_file:
            password = _read_password_file(password_file)
        elif environ.get(PASSWORD_ENV):
            password = environ[PASSWORD_ENV]
        else:
            raise ConfigError("--auth", f"{value!r} has no password",
                              f"use --auth {user}:PASSWORD, or keep it out of the shell history: "
                              f"export {PASSWORD_ENV}=... or --auth-file FILE (one line: the password)")
    if not password:
        raise ConfigError("--auth", "the password is empty, so nobody could log in", "choose a non-empty password")
    return user, password


def _read_password_file(path: str) -> str:
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError("--auth-file", f"cannot read {p}: {e.strerror or e}", "give a readable file holding the password")
    lines = text.splitlines()
    return lines[0].strip() if lines else ""


# ---------------------------------------------------------------- confinement

def confine(allow_dirs: list[str], shared: bool = False) -> None:
    """Turn confinement on for this process and the training children it starts; `shared`: the app listens
    beyond loopback."""
    roots = []
    for d in allow_dirs:
        p = Path(d).expanduser()
        if not p.is_dir():
            raise ConfigError("--allow-dir", f"{d} is not a folder", "give an existing folder to share")
        roots.append(str(p.resolve()))
    os.environ[CONFINE_ENV] = "1"
    os.environ[ALLOW_ENV] = os.pathsep.join(roots)
    if shared:
        os.environ[SHARED_ENV] = "1"


def shared() -> bool:
    return os.environ.get(SHARED_ENV) == "1"


def confined() -> bool:
    return os.environ.get(CONFINE_ENV) == "1"


def allowed_roots() -> list[Path]:
    """The app home (its uploads, models and runs) and the operator's --allow-dir folders, resolved."""
    extra = [Path(p) for p in os.environ.get(ALLOW_ENV, "").split(os.pathsep) if p]
    return [home().resolve()] + [p.resolve() for p in extra]


def check_source(field: str, source: str) -> None:
    """When confined, refuse a dataset / model source that names a file or folder outside the allowed roots.
    Built-in ids and hub ids (no such path on disk) pass: they do not read the operator's files."""
    source = (source or "").strip()
    if not confined() or not source or source.startswith("builtin:"):
        return
    p = Path(source).expanduser()
    if not (source.startswith(("/", ".", "~")) or p.exists()):
        return
    real = p.resolve()  # follows symlinks: a link inside the home pointing at /etc is still /etc
    roots = allowed_roots()
    if any(real == r or r in real.parents for r in roots):
        return
    raise ConfigError(field, f"{source} is outside the folders this shared app may read",
                      "upload the file instead, or ask the operator to start the app with --allow-dir "
                      "pointing at its folder")


def check_config(cfg) -> None:
    """check_source for every path a RunConfig reads: the model, the dataset and the eval file; and a GRPO reward
    file, which is code: refused outright by an app shared beyond this computer."""
    check_source("model.source", cfg.model.source)
    check_source("data.source", cfg.data.source)
    check_source("data.val_source", cfg.data.val_source)
    if cfg.rewards.file.strip() and shared():
        raise ConfigError("rewards.file", "a reward file is Python code that would run on this computer, and this "
                          "app is shared beyond it (--host is not loopback)",
                          "use the preset rewards here, or run the app on 127.0.0.1 to use your own reward file")
