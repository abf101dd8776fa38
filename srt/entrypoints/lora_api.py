"""Loading and unloading LoRA adapters while serving: SGLang's ``/load_lora_adapter`` and
``/unload_lora_adapter``, also under vLLM's ``/v1/`` paths.

The folder is read by every scheduler rank (a local path on the server's machine); an
adapter is refused if it does not fit the slots fixed at start-up, and unloading is
refused while a request uses it. Both are operator actions: put the server behind
``--api-key`` when clients should not load files.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from srt.entrypoints.errors import APIError
from srt.runtime.generate_request import InvalidRequestError
from srt.tokenizer_manager.manager import TokenizerManager

router = APIRouter()


class LoadLoRAAdapterReqInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_path: str


class UnloadLoRAAdapterReqInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str


class LoRAAdapterResult(BaseModel):
    success: bool
    loaded_adapters: dict[str, str]  # name -> folder, after the call


@router.post("/load_lora_adapter")
@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRAAdapterReqInput, request: Request) -> LoRAAdapterResult:
    tm: TokenizerManager = request.app.state.tokenizer_manager
    await tm.load_lora_adapter(body.lora_name, body.lora_path)
    return LoRAAdapterResult(success=True, loaded_adapters=tm.lora_adapters)


@router.post("/unload_lora_adapter")
@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRAAdapterReqInput, request: Request) -> LoRAAdapterResult:
    tm: TokenizerManager = request.app.state.tokenizer_manager
    try:
        await tm.unload_lora_adapter(body.lora_name)
    except InvalidRequestError as e:
        raise APIError(404 if e.code == "model_not_found" else 400, str(e), param="lora_name", code=e.code) from e
    return LoRAAdapterResult(success=True, loaded_adapters=tm.lora_adapters)
