import pkgutil
import subprocess
import sys

import core
import ui

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "gradio")


def _modules(package) -> list[str]:
    """Every module of a package, found by walking its folder (a new module is checked without listing it)."""
    return [package.__name__] + [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]


def _imported_after(modules: list[str]) -> set[str]:
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_the_walk_finds_the_packages_modules():
    found = _modules(core) + _modules(ui)
    for name in ("core.chat", "core.evaluate", "core.runs.resolve", "core.models", "core.commands.eval", "ui.chat_tab"):
        assert name in found


def test_core_never_imports_gradio():
    assert "gradio" not in _imported_after(_modules(core))


def test_every_ui_module_imports():
    _imported_after(_modules(ui))


def test_vram_stays_light():
    """The VRAM panel runs on every settings change and the first page must be fast: no heavy library."""
    assert not set(HEAVY) & _imported_after(["core.estimate.vram"])


def test_cli_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "core", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("train", "data", "estimate", "runs", "chat", "eval", "export", "doctor"):
        assert cmd in out
