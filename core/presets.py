"""Presets: commented YAML files in presets/ (built in) and $LORA_GARAGE_HOME/presets (the user's own).

A preset is a partial RunConfig: sections it leaves out keep the defaults (or, in `apply`, the caller's values).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from core import config as C
from core.errors import ConfigError
from core.paths import BUILTIN_PRESETS_DIR, user_presets_dir

DEFAULT_PRESET = "cpu-demo"


def _all_files() -> dict[str, Path]:
    files = {p.stem: p for p in sorted(BUILTIN_PRESETS_DIR.glob("*.yaml"))}
    for p in sorted(user_presets_dir().glob("*.yaml")):
        files.setdefault(p.stem, p)  # a user preset never shadows a built-in one
    return files


def list_presets() -> list[str]:
    return list(_all_files())


def header(name: str) -> str:
    """All leading comment lines of a preset, without the '#'."""
    lines = []
    for line in _path(name).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return "\n".join(lines).strip()


def _path(name: str) -> Path:
    files = _all_files()
    if name not in files:
        raise ConfigError("preset", f"no preset named {name!r}", f"choose one of: {', '.join(files)}")
    return files[name]


def raw(name: str) -> dict:
    """The preset's YAML as a dict (only the sections and keys it sets)."""
    path = _path(name)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError("preset", f"{path} is not valid YAML: {e}", "fix or delete that preset file")
    C.from_dict(data)  # validate keys and types early, with errors naming the field
    return data


def load(name: str) -> C.RunConfig:
    """The preset on its own: every field it names, every other field at its default."""
    return C.from_dict(raw(name))


def named_fields(name: str) -> list[str]:
    """The "section.key" fields the preset sets; a switch to it resets every other field to its default."""
    return [f"{section}.{key}" for section, values in raw(name).items() for key in (values or {})]


def resets(name: str, current: dict) -> list[tuple[str, object, object]]:
    """(field, value now, default) for each field in `current` ({"section.key": value}) that the preset does not
    name and that differs from the default: what a switch to the preset puts back."""
    named, default, out = set(named_fields(name)), C.RunConfig().to_dict(), []
    for dotted, value in current.items():
        section, key = dotted.split(".", 1)
        base = default.get(section, {}).get(key)
        if dotted not in named and key in default.get(section, {}) and value != base and not (
                isinstance(base, (int, float)) and isinstance(value, (int, float)) and float(value) == float(base)):
            out.append((dotted, value, base))
    return out


def apply(name: str, base: C.RunConfig) -> C.RunConfig:
    """Overlay a preset's settings on `base`; what the preset does not set stays as it was."""
    d = base.to_dict()
    for section, values in raw(name).items():
        d.setdefault(section, {}).update(values or {})
    return C.from_dict(d)


def save_user_preset(name: str, cfg: C.RunConfig, description: str = "") -> Path:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", name or ""):
        raise ConfigError("preset name", f"{name!r} may only use letters, digits, - and _",
                          "pick a short name like my-8gb-setup")
    if (BUILTIN_PRESETS_DIR / f"{name}.yaml").exists():
        raise ConfigError("preset name", f"{name!r} is a built-in preset", "pick another name")
    cfg.validate()
    path = user_presets_dir() / f"{name}.yaml"
    header_text = f"# {name}: {description or 'saved from LoRA Garage'}\n#\n#   python -m core train --preset {name}\n"
    C.save_yaml(cfg, path, header_text)
    return path
