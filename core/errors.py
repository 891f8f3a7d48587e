"""Error types whose messages are written for users.

Every error carries a `message` (what is wrong) and a `hint` (what to do about it). The UI shows both; the CLI
prints both and exits non-zero. `kind` is a short machine-readable tag that ends up in status.json.
"""


class GarageError(Exception):
    """Base class: an error the user can act on."""

    kind = "error"

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.hint}" if self.hint else self.message

    def to_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, "hint": self.hint}


class ConfigError(GarageError):
    """A setting is invalid. `field` is the dotted name, e.g. `lora.r`."""

    kind = "config"

    def __init__(self, field: str, message: str, hint: str = ""):
        super().__init__(f"{field}: {message}", hint)
        self.field = field


class ModelError(GarageError):
    kind = "model"


class DatasetError(GarageError):
    """Bad data. Names the file and, where known, the row or line."""

    kind = "dataset"

    def __init__(self, message: str, hint: str = "", file: str | None = None, line: int | None = None):
        where = file or ""
        if line is not None:
            where = f"{where}, line {line}" if where else f"line {line}"
        super().__init__(f"{where}: {message}" if where else message, hint)
        self.file = file
        self.line = line


class BusyError(GarageError):
    kind = "busy"


class RunError(GarageError):
    kind = "run"


class OutOfMemory(GarageError):
    kind = "oom"


class Diverged(GarageError):
    kind = "nan"


class DiskFull(GarageError):
    kind = "disk"


DISK_FULL_ERRNOS = (28, 122)  # ENOSPC, EDQUOT (Linux numbers; Rust's io::Error prints them as "(os error N)")
DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "(os error 28)", "(os error 122)")


def disk_full_cause(e: BaseException | None) -> BaseException | None:
    """The exception in e's chain that says the disk is full, or None. Libraries wrap the OS error: safetensors
    raises SafetensorError("I/O error: No space left on device (os error 28)"), torch a RuntimeError naming the
    file; the errno, or failing that the OS's own words, is what they keep."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return e
        if any(text in str(e) for text in DISK_FULL_TEXT):
            return e
        e = e.__cause__ or e.__context__
    return None
