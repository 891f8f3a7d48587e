"""Byte units and the one way sizes are shown to users: GiB, labelled "GB" as GPU and RAM sizes are sold."""

GiB = 1024 ** 3
MiB = 1024 ** 2


def gb(n: float, digits: int = 1) -> str:
    """Bytes as GiB with `digits` decimals, labelled GB: gb(8 * GiB) -> "8.0 GB"."""
    return f"{n / GiB:.{digits}f} GB"
