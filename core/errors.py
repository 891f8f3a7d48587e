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
