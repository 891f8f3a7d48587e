"""llama.cpp's own tools for GGUF export, fetched on first use and never installed into the app's environment.

- The converter (convert_hf_to_gguf.py with its `conversion` package and its own gguf-py) comes from the
  llama-cpp-python source distribution on PyPI, which vendors llama.cpp. We pin the version and the sdist's sha256,
  download it with pip on first export, verify it, and unpack only those files into <home>/tools/. It runs in a
  child process (core/gguf/child.py) with its gguf-py first on the path: its gguf module is newer than the PyPI
  gguf we load the built-in model with, and the two must not meet in one process.
- The k-quant quantizer (Q4_K_M and friends) is llama.cpp's C++ code: `llama_cpp.llama_model_quantize` from the
  same llama-cpp-python release, compiled when pip installs it (cmake + a C++ compiler; pip caches the wheel).
  f16 and q8_0 come straight from the converter and need no compiler.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Callable

from core import paths
from core.errors import DiskFull, GarageError
from core.runs import portable
from core.runs import procs

LLAMA_CPP_PYTHON = "0.3.36"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# what the converters need from vendor/llama.cpp (and the licence that comes with it)
_MEMBERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
CHILD = Path(__file__).with_name("child.py")

# GGUF file types the export offers: the converter writes f16 / q8_0 itself; the rest go through the quantizer
CONVERTER_TYPES = ("f16", "q8_0")
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")
QUANTS = CONVERTER_TYPES + K_QUANTS

Say = Callable[[str], None]


def tools_dir() -> Path:
    """<home>/tools, or $LORA_GARAGE_TOOLS (tests share one download across homes)."""
    return Path(os.environ.get("LORA_GARAGE_TOOLS") or paths.home() / "tools")


def converter_dir() -> Path:
    return tools_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON}"


def ensure_converter(say: Say | None = None) -> Path:
    """The unpacked converter folder; downloads and verifies the sdist the first time (about 77 MB)."""
    say = say or (lambda m: None)
    target = converter_dir()
    if (target / "VERIFIED").is_file():
        return target
    tools_dir().mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(tools_dir()).free < 200_000_000:
        raise DiskFull(f"fetching llama.cpp's converter needs about 200 MB in {tools_dir()}",
                       "free some disk space, or point $LORA_GARAGE_HOME at a bigger drive")
    with tempfile.TemporaryDirectory(dir=tools_dir(), prefix=".fetch-") as tmp:
        sdist = Path(tmp) / SDIST
        local = os.environ.get("LORA_GARAGE_LLAMA_SDIST")  # an already downloaded copy (offline machines)
        if local:
            say(f"using llama.cpp's converter from {local}")
            shutil.copyfile(local, sdist)
        else:
            say(f"first GGUF export: downloading llama.cpp's converter (llama-cpp-python {LLAMA_CPP_PYTHON} "
                "source, about 77 MB) with pip, once")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0 or not sdist.is_file():
                raise GarageError(f"pip could not download llama-cpp-python {LLAMA_CPP_PYTHON}'s source: "
                                  f"{(done.stderr or done.stdout).strip()[-600:]}",
                                  "check the network connection to PyPI, or download "
                                  f"{SDIST} yourself and set LORA_GARAGE_LLAMA_SDIST to its path")
        digest = paths.file_sha256(sdist)
        if digest != SDIST_SHA256:
            raise GarageError(f"{SDIST} has sha256 {digest}, not the pinned {SDIST_SHA256}",
                              "the download is damaged or not the release we tested; delete it and try again")
        say("unpacking the converter and its gguf-py (checksum verified)")
        unpacked = Path(tmp) / "llama.cpp"
        _extract(sdist, unpacked)
        (unpacked / "VERIFIED").write_text(f"{SDIST} sha256 {digest}\n")
        shutil.rmtree(target, ignore_errors=True)  # an earlier attempt without VERIFIED
        os.replace(unpacked, target)
    return target


def _extract(sdist: Path, out: Path) -> None:
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
            if rel and any(rel == want or (want.endswith("/") and rel.startswith(want)) for want in _MEMBERS) \
                    and (m.isfile() or m.isdir()):
                m.name = rel
                members.append(m)
        if not any(m.name == "convert_hf_to_gguf.py" for m in members):
            raise GarageError(f"{sdist.name} has no vendor/llama.cpp/convert_hf_to_gguf.py",
                              "the pinned release changed layout; report this as a bug")
        tar.extractall(out, members=members, filter="data")


def child_env(converter: Path | None) -> dict:
    """The child's environment: the converter's gguf-py and folder first on the path, nothing of ours."""
    env = dict(os.environ)
    if converter is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(converter / "gguf-py"), str(converter)])
    else:
        env.pop("PYTHONPATH", None)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    return env


def run_child(args: list[str], converter: Path | None, say: Say, what: str) -> str:
    """Run core/gguf/child.py with `args`, pass its lines to `say`, return its output; a failure names `what`."""
    cmd = [sys.executable, str(CHILD)] + args
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=child_env(converter), **portable.detached())
    lines = []
    for line in proc.stdout:
        line = line.rstrip()
        lines.append(line)
        if line.startswith(("INFO:hf-to-gguf:Model successfully", "bits:", "quantize:", "note:")):
            say(line)
    rc = proc.wait()
    out = "\n".join(lines)
    if rc != 0:
        tail = "\n".join(lines[-12:])
        if "No space left on device" in out or "ENOSPC" in out:
            raise DiskFull(f"the disk filled up while {what}", "free some disk space or export to another drive")
        if "BPE pre-tokenizer was not recognized" in out:
            raise GarageError(f"llama.cpp's converter does not know this model's tokenizer (its pre-tokenizer "
                              f"hash is not in llama-cpp-python {LLAMA_CPP_PYTHON}'s list)",
                              "a tokenizer of a newer model family needs a newer llama.cpp; export --merged and "
                              "convert with a current llama.cpp checkout")
        raise GarageError(f"{what} failed (exit code {rc}); llama.cpp's last lines:\n{tail}",
                          f"this model may be newer than llama-cpp-python {LLAMA_CPP_PYTHON}'s converter knows; "
                          "export --merged and convert it with a current llama.cpp checkout")
    return out


# ---- the quantizer (llama-cpp-python, compiled on install) ----

def quantizer_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def compiler_missing() -> str | None:
    """What is missing to build llama-cpp-python, or None. cmake comes from PyPI in pip's build env if absent."""
    if not any(shutil.which(c) for c in (os.environ.get("CXX") or "", "c++", "g++", "clang++") if c):
        return "a C++ compiler (c++, g++ or clang++)"
    return None


def ensure_quantizer(say: Say | None = None) -> None:
    """Install llama-cpp-python (pinned, hash-checked) into this environment on first use of a k-quant."""
    say = say or (lambda m: None)
    if quantizer_installed():
        return
    missing = compiler_missing()
    if missing:
        raise GarageError(f"k-quants (q4_k_m and others) need llama.cpp's quantizer, which is compiled when it is "
                          f"installed, and this machine has no {missing}",
                          "install one (Debian/Ubuntu: sudo apt install build-essential cmake; Fedora: sudo dnf "
                          "install gcc-c++ cmake; macOS: xcode-select --install), or export --quant f16 / q8_0, "
                          "which need no compiler")
    say(f"first k-quant export: building llama.cpp's quantizer (llama-cpp-python {LLAMA_CPP_PYTHON}); this compiles "
        "C++ for about 7 CPU-minutes, once: pip keeps the built wheel")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
        req.write(f"llama-cpp-python=={LLAMA_CPP_PYTHON} --hash=sha256:{SDIST_SHA256}\n")
    try:
        cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
               "--require-hashes", "-r", req.name]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip())
            if "Building wheel" in line or "Successfully" in line or "Using cached" in line:
                say(line.strip())
        if proc.wait() != 0:
            raise GarageError("building llama-cpp-python failed:\n" + "\n".join(lines[-15:]),
                              "read the compiler's message above; export --quant f16 / q8_0 needs no quantizer")
    finally:
        os.unlink(req.name)
    # its runtime needs these; pinned like the rest of our requirements
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "diskcache==5.6.3"], check=True)
    importlib.invalidate_caches()
    say("quantizer installed")


# ---- llama.cpp's runtime, in a child process ----

class LlamaChild:
    """One GGUF in llama.cpp's runtime (llama-cpp-python), served by `child.py serve` in its own process.

    A crash in llama.cpp's C++ (a bad file, a kernel bug on some CPU) ends that child, not the app: the next request
    raises a GarageError that names how it ended and its last lines."""

    def __init__(self, gguf: Path, n_ctx: int = 1024, logits: bool = False):
        """`logits`: keep every position's logits (the parity check's "logits" op). It costs n_ctx x vocab floats
        of RAM (800 MB for SmolLM2 at 4096 tokens), so a chat goes without."""
        self.gguf = Path(gguf)
        self._meta: dict | None = None
        self.err = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, str(CHILD), "serve", str(self.gguf), str(n_ctx),
                                      "logits" if logits else "last"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                     env=child_env(None), **portable.detached())

    def ask(self, op: str, **fields) -> dict:
        self._send(op, fields)
        return self._answer(op)

    def meta(self) -> dict:
        """The GGUF's chat template, BOS and EOS text and whether llama.cpp adds BOS (asked once)."""
        if self._meta is None:
            self._meta = self.ask("meta")
        return self._meta

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The prompt as the GGUF sees it, for the parity check and the Chat page alike: its embedded template
        rendered as llama-cpp-python renders it (render_embedded below; a template error is raised as it is),
        tokenised by its own tokenizer."""
        m = self.meta()
        text = render_embedded(m["template"], messages, m["bos"], m["eos"])
        return self.ask("tokenize", text=text, add_bos=m["add_bos"])["ids"]

    def stream(self, **fields):
        """The "stream" op: yields each {"delta": text} as llama.cpp makes it, then the final {"done", "stopped"}.
        A reader that leaves early cancels it in the child and reads on to its end, so the next request is clean."""
        self._send("stream", fields)
        ended = False
        try:
            while not ended:
                try:
                    answer = self._answer("stream")
                except GarageError:
                    ended = True   # an error answer ends the request; a child that died has nothing more to say
                    raise
                ended = bool(answer.get("done"))
                yield answer
        finally:
            if not ended:          # the reader left mid-stream (Stop, a closed page)
                self._send("cancel", {})
                while not self._answer("stream").get("done"):
                    pass

    def _send(self, op: str, fields: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass   # it already ended: the read that follows says how

    def _answer(self, op: str) -> dict:
        """The next answer line; an error answer, or the child's end, raises a GarageError naming `op`."""

        for line in self.proc.stdout:
            if line.startswith("@@ "):
                answer = json.loads(line[3:])
                if "error" in answer:
                    raise GarageError(f"llama.cpp's runtime could not {op} on {self.gguf.name}: {answer['error']}",
                                      "the GGUF file may be damaged: export it again")
                return answer
        code = self.proc.wait()
        self.err.seek(0)
        tail = "\n".join(self.err.read().splitlines()[-8:])
        raise GarageError(f"llama.cpp's runtime ended ({procs.exit_words(code)}) during '{op}' on {self.gguf.name}"
                          + (f"; its last lines:\n{tail}" if tail else ""),
                          "the GGUF files are kept and the app runs on; see README, Troubleshooting, on llama.cpp's "
                          "runtime ending (an export's check can use transformers' loader instead)")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "close"}\n')
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()


def render_embedded(template: str, messages: list[dict], bos: str, eos: str) -> str:
    """A GGUF's tokenizer.chat_template rendered as llama.cpp's Python runtime renders it (jinja2, sandboxed)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # heavy

    if not template:
        raise ValueError("the GGUF has no tokenizer.chat_template")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(ValueError(msg))
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token=bos,
                                            eos_token=eos)
