import subprocess
import sys

CORE_MODULES = ["core", "core.__main__", "core.config", "core.errors", "core.paths", "core.presets", "core.models",
                "core.hardware", "core.vram", "core.data", "core.training", "core.runs", "core.runner", "core.chat",
                "core.export", "core.commands.doctor", "core.commands.train", "core.commands.data",
                "core.commands.estimate", "core.commands.runs", "core.commands.chat", "core.commands.eval",
                "core.commands.export"]


def test_core_never_imports_gradio():
    code = ("import importlib, sys\n"
            f"for m in {CORE_MODULES!r}: importlib.import_module(m)\n"
            "bad = [m for m in sys.modules if m == 'gradio' or m.startswith('gradio.')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "core", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("train", "data", "estimate", "runs", "chat", "eval", "export", "doctor"):
        assert cmd in out
