"""The C kernels of this package for CPUs, compiled once per machine and called through ctypes.

They are plain C with OpenMP (no torch headers), so building takes about a second with
the system's C compiler (``$CC``, else ``cc`` / ``gcc``) and needs nothing from PyPI.
The shared library is cached under ``$SRT_CACHE_DIR/kernels`` (default
``~/.cache/srt/kernels``), keyed by the source and the CPU, since it is built for the
host's instruction set (``-march=native``). Where no compiler works, ``available()`` is
False and callers keep their torch path.

The library links ``libgomp.so.1``, the OpenMP runtime torch itself loaded, so the
kernels run on torch's thread pool and follow ``torch.set_num_threads``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import torch

logger = logging.getLogger(__name__)

_SOURCES = [
    os.path.join(os.path.dirname(os.path.abspath(__file__)), name) for name in ("cpu_decode_attention.c", "cpu_token_bitmask.c")
]
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared"]

_i64, _i32, _f32, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
_DECODE_ARGTYPES = [
    _ptr, _ptr,  # q, out
    _ptr, _ptr, _i32,  # k_buffer, v_buffer, is_bf16
    _i64, _i64,  # k/v slot strides
    _ptr, _i64, _ptr, _ptr,  # req_to_token, its row stride, rows, seq_lens
    _i32, _i32, _i32, _i32, _i32,  # batch, heads, kv_heads, head_dim, v_head_dim
    _f32, _f32, _i64, _i64,  # scaling, softcap, window, span_len
    _ptr,  # sinks (NULL for none)
]  # fmt: skip
# Each request's keys are cut into spans of at least this many positions, and into
# enough spans for about this many tasks per thread (load balance at small batch).
_MIN_SPAN = 64
_TASKS_PER_THREAD = 4

KV_DTYPES = (torch.float32, torch.bfloat16)


def _cache_dir() -> str:
    root = os.environ.get("SRT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "srt")
    return os.path.join(root, "kernels")


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU model and its flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return "".join(lines)


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


def _build(compiler: str, target: str) -> None:
    """Compile into a temporary file, then rename: concurrent builders (TP ranks) never see half a library."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(target))
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, *_SOURCES, "-o", partial, "-lmvec", "-lm"], check=True, capture_output=True, text=True)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


@functools.cache
def _library() -> ctypes.CDLL | None:
    if platform.system() != "Linux":
        return None
    digest = hashlib.sha256(_cpu_signature().encode() + " ".join(_FLAGS).encode())
    for source in _SOURCES:
        with open(source, "rb") as f:
            digest.update(f.read())
    target = os.path.join(_cache_dir(), f"srt_cpu_kernels-{digest.hexdigest()[:16]}.so")
    try:
        if not os.path.exists(target):
            compiler = _compiler()
            if compiler is None:
                raise RuntimeError("no C compiler found (set $CC)")
            _build(compiler, target)
            logger.info("built the CPU kernels: %s", target)
        library = ctypes.CDLL(target)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        logger.warning("CPU kernels unavailable, using the torch paths (%s)", detail)
        return None
    library.srt_decode_attention.argtypes = _DECODE_ARGTYPES
    library.srt_decode_attention.restype = _i32
    library.srt_apply_token_bitmask.argtypes = [_ptr, _i64, _ptr, _i64, _ptr, _i64, _i64]
    library.srt_apply_token_bitmask.restype = None
    return library


def available() -> bool:
    return _library() is not None


def decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    rows: torch.Tensor,
    seq_lens: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query per request, ``q [B, H, D]``, over the request's ``seq_lens[b]``
    keys at KV slots ``req_to_token[rows[b], :seq_lens[b]]`` of ``k_buffer / v_buffer
    [slots, H_kv, D]`` (float32 or bfloat16), with ``sinks [H]`` (attention sinks) in each
    head's softmax denominator when given. Returns ``[B, H, Dv]`` in ``q``'s dtype."""
    library = _library()
    if library is None:
        raise RuntimeError("the CPU attention kernel could not be built")
    if k_buffer.dtype not in KV_DTYPES or v_buffer.dtype != k_buffer.dtype:
        raise TypeError(f"KV cache dtype {k_buffer.dtype} is not supported by the CPU kernel")
    for name, t in (("k_buffer", k_buffer), ("v_buffer", v_buffer), ("req_to_token", req_to_token)):
        if t.device.type != "cpu" or not t[0].is_contiguous():
            raise ValueError(f"{name} must be a CPU tensor whose rows are contiguous")
    batch, heads, head_dim = q.shape
    kv_heads, v_head_dim = k_buffer.shape[1], v_buffer.shape[2]
    total = int(seq_lens.sum()) if sliding_window is None else int(seq_lens.clamp(max=sliding_window).sum())
    span_len = max(_MIN_SPAN, -(-total // (_TASKS_PER_THREAD * torch.get_num_threads())))
    q32 = q.to(torch.float32).contiguous()
    out = torch.empty(batch, heads, v_head_dim, dtype=torch.float32)
    rows = rows.to(torch.int64).contiguous()
    seq_lens = seq_lens.to(torch.int64).contiguous()
    sinks32 = None if sinks is None else sinks.to(torch.float32).contiguous()
    status = library.srt_decode_attention(
        q32.data_ptr(), out.data_ptr(),
        k_buffer.data_ptr(), v_buffer.data_ptr(), int(k_buffer.dtype == torch.bfloat16),
        k_buffer.stride(0), v_buffer.stride(0),
        req_to_token.data_ptr(), req_to_token.stride(0), rows.data_ptr(), seq_lens.data_ptr(),
        batch, heads, kv_heads, head_dim, v_head_dim,
        scaling, softcap or 0.0, sliding_window or 0, span_len,
        None if sinks32 is None else sinks32.data_ptr(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("the CPU attention kernel could not allocate its scratch memory")
    return out if q.dtype == torch.float32 else out.to(q.dtype)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """``logits[r, t] = -inf`` in place for each row ``r`` of ``rows`` and token ``t`` whose bit
    ``bitmask[r]`` (int32 words, 32 tokens each) leaves clear. ``logits`` is float32 [B, V]
    with contiguous rows, ``bitmask`` contiguous [B, ceil(V / 32)], both on the CPU."""
    library = _library()
    if library is None:
        raise RuntimeError("the CPU kernels could not be built")
    if logits.dtype != torch.float32 or logits.stride(-1) != 1 or not bitmask.is_contiguous() or bitmask.dtype != torch.int32:
        raise ValueError("apply_token_bitmask wants float32 logits with contiguous rows and a contiguous int32 bitmask")
    index = torch.tensor(rows, dtype=torch.int64)
    library.srt_apply_token_bitmask(
        logits.data_ptr(), logits.stride(0), bitmask.data_ptr(), bitmask.shape[1], index.data_ptr(), len(rows), logits.shape[1]
    )
