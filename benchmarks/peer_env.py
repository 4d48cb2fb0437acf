"""Peer tools that pin versions ours cannot take run in their own virtual environment, created on first use.

    python benchmarks/peer_env.py llmcompressor      # create (or reuse) ~/.cache/hf_prune/peer_venvs/llmcompressor

The venv sees this environment's packages (``--system-site-packages``: torch is not downloaded again) and installs
the peer's pinned versions on top, so its own ``transformers`` shadows ours inside that venv only. A venv is reused
when its marker file records the same pins; a failed install leaves no marker, so the next call retries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

VENV_ROOT = Path(os.environ.get("HF_PRUNE_PEER_VENVS", Path.home() / ".cache" / "hf_prune" / "peer_venvs"))
# the newest releases on the registry when this benchmark was written; llm-compressor 0.14 pins transformers <= 5.17
PINS: dict[str, list[str]] = {
    "llmcompressor": ["llmcompressor==0.14.0.1", "transformers==5.17.0", "compressed-tensors==0.19.0"],
    # these two would fit our pins, but a benchmark does not install into the user's environment
    "torch-pruning": ["torch-pruning==1.6.1"],
    # torchprofile: ModelOpt's fastnas needs it; --no-deps, or pip replaces the CPU torch with a CUDA build
    "modelopt": ["nvidia-modelopt==0.47.0", "--no-deps torchprofile==0.0.4"],
}


def venv_python(name: str) -> Path:
    return VENV_ROOT / name / "bin" / "python"


def ensure_venv(name: str, log=sys.stderr) -> Path:
    """Create the venv for peer ``name`` with its pinned packages unless it already exists; return its python."""
    if name not in PINS:
        raise ValueError(f"unknown peer venv {name!r}; known: {', '.join(PINS)}")
    root, pins = VENV_ROOT / name, PINS[name]
    marker = root / "hf_prune_pins.json"
    if marker.is_file() and json.loads(marker.read_text()) == pins and venv_python(name).is_file():
        return venv_python(name)
    root.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(root)], check=True,
                   stdout=log, stderr=log)
    plain = [p for p in pins if not p.startswith("--no-deps ")]
    subprocess.run([str(venv_python(name)), "-m", "pip", "install", *plain], check=True, stdout=log, stderr=log)
    for p in pins:
        if p.startswith("--no-deps "):
            subprocess.run([str(venv_python(name)), "-m", "pip", "install", "--no-deps", p.split()[1]], check=True,
                           stdout=log, stderr=log)
    marker.write_text(json.dumps(pins))
    return venv_python(name)


def package_version(python: Path | str, package: str) -> str | None:
    """The installed version of ``package`` as seen by interpreter ``python`` (None if absent)."""
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


if __name__ == "__main__":
    for peer in sys.argv[1:] or list(PINS):
        print(peer, ensure_venv(peer), flush=True)
