"""Device choice, dtype resolution and memory budgets: the one place that knows CUDA from CPU."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str, gpu_id: int = 0) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
        return torch.device("cuda", gpu_id)
    return torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX-512 BF16 or AMX); otherwise bf16 is emulated and slow."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, checkpoint_dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto`` follows the checkpoint, except that bf16/fp16 checkpoints run in fp32 on CPUs that lack
    native bf16 (fp16 matmul is never fast on CPU)."""
    if dtype != "auto":
        return _DTYPES[dtype]
    chosen = checkpoint_dtype if checkpoint_dtype in _DTYPES.values() else torch.float32
    if device.type == "cpu":
        if chosen == torch.float16 or (chosen == torch.bfloat16 and not cpu_has_native_bf16()):
            chosen = torch.float32
    return chosen


def prepacks_linear_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """CPU GEMMs run on oneDNN's pre-blocked weights (fp32 and bf16 only)."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()


def default_attention_backend(device: torch.device) -> str:
    """What ``--attention-backend auto`` means: Triton kernels on CUDA, torch ops elsewhere."""
    return "triton" if device.type == "cuda" else "torch"


def experts_kernel(device: torch.device) -> str:
    """The expert GEMM of MoE layers: the Triton fused-MoE kernel on CUDA, torch's grouped GEMM elsewhere."""
    return "triton" if device.type == "cuda" else "grouped_mm"


def lora_kernel(device: torch.device) -> str:
    """The batched LoRA of adapted layers: the Triton SGMV kernels on CUDA, a GEMM pair per adapter elsewhere."""
    return "triton" if device.type == "cuda" else "torch"


def in_host_memory(device: torch.device) -> bool:
    """Whether tensors on ``device`` live in host memory, where C code called through ctypes can read them."""
    return device.type == "cpu"


def resolve_kv_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    return model_dtype if kv_cache_dtype == "auto" else _DTYPES[kv_cache_dtype]


def default_mem_fraction(device: torch.device) -> float:
    # On CUDA the fraction covers weights + KV of the whole GPU, as in SGLang; on CPU the
    # KV cache gets a share of the RAM that is available, which other processes also need.
    return 0.88 if device.type == "cuda" else 0.25


def default_chunked_prefill_size(device: torch.device) -> int:
    return 8192 if device.type == "cuda" else 2048


def available_memory_bytes(device: torch.device) -> int:
    """Memory that the KV cache may still take on this device."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return _cpu_available_bytes()


def total_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return _nvml_total_bytes(device.index or 0)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_budget_bytes(device: torch.device, mem_fraction_static: float, ranks_on_host: int = 1) -> int:
    """Bytes for the KV cache, measured after the weights are loaded.

    CUDA: of the memory that ``mem_fraction_static`` of the GPU allows, what the weights
    (and everything else on the GPU) left free. CPU: that fraction of the available RAM,
    split evenly between the ``ranks_on_host`` schedulers that share it.
    """
    available = available_memory_bytes(device)
    if device.type == "cuda":
        reserved_for_others = total_memory_bytes(device) * (1 - mem_fraction_static)
        return max(0, int(available - reserved_for_others))
    return int(available * mem_fraction_static) // ranks_on_host


def _cpu_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _nvml_total_bytes(gpu_id: int) -> int:
    """Total memory of the GPU, from NVML when it is there (it sees the whole card, as CUDA_VISIBLE_DEVICES permits)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            physical = int(visible.split(",")[gpu_id]) if visible else gpu_id
            return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(physical)).total
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # NVML missing (no driver) or UUID-style CUDA_VISIBLE_DEVICES
        logger.debug("NVML unavailable (%s); using torch.cuda for total memory", e)
        return torch.cuda.get_device_properties(gpu_id).total_memory
