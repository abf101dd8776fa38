"""The scheduler process: ``recv → dispatch → step → send`` around one Scheduler.

An idle scheduler blocks on its socket; a busy one only polls between steps.
"""

from __future__ import annotations

import logging
from multiprocessing.connection import Connection

import torch
import zmq
from transformers import AutoTokenizer

from srt.platform.device import resolve_device
from srt.platform.distributed import TPGroup, init_tp_group
from srt.runtime.ipc import IpcEndpoints, Receiver, Sender
from srt.runtime.messages import (
    AbortReq,
    decode,
    encode,
    BatchTokenOut,
    FlushCacheDone,
    FlushCacheReq,
    GetInternalStateReq,
    TokenizedGenerateReq,
)
from srt.model_executor.model_runner import ModelRunner
from srt.scheduler.scheduler import Scheduler
from srt.server_args import ServerArgs

logger = logging.getLogger(__name__)

_IDLE_HEARTBEAT_MS = 1000


def run_scheduler(
    server_args: ServerArgs,
    model_path: str,
    tokenizer_path: str,
    endpoints: IpcEndpoints,
    dp_rank: int,
    tp_rank: int,
    gpu_id: int,
    dist_init_method: str,
    num_threads: int,
    ready: Connection,
) -> None:
    torch.set_num_threads(num_threads)
    tp_group = init_tp_group(tp_rank, server_args.tp_size, resolve_device(server_args.device, gpu_id), dist_init_method)
    runner = ModelRunner(server_args, model_path, tp_group, gpu_id=gpu_id)
    tokenizer = None if server_args.skip_tokenizer_init else AutoTokenizer.from_pretrained(
        tokenizer_path, trust_remote_code=server_args.trust_remote_code
    )
    scheduler = Scheduler(server_args, runner, tokenizer)
    is_leader = tp_rank == 0
    context = zmq.Context()
    inbox = Receiver(context, endpoints.scheduler_inputs[dp_rank]) if is_leader else None
    outbox = Sender(context, endpoints.detokenizer_input) if is_leader else None
    ready.send(
        {
            "status": "ready",
            "max_total_tokens": runner.plan.max_total_tokens,
            "max_req_input_len": scheduler.max_req_input_len,
            "context_length": scheduler.context_length,
            "vocab_size": scheduler.vocab_size,
            "weight_bytes": runner.weight_bytes(),
        }
    )
    logger.info("scheduler rank %d ready", tp_rank)
    while True:
        messages = _next_messages(scheduler, inbox, tp_group)
        outputs = []
        for msg in messages:
            reply = _dispatch(scheduler, msg)
            if isinstance(reply, list):
                outputs.extend(reply)
            elif reply is not None and is_leader:
                outbox.send(reply)
        outputs.extend(scheduler.step())
        if outputs and is_leader:
            outbox.send(BatchTokenOut(outputs))


def _next_messages(scheduler: Scheduler, inbox: Receiver | None, tp_group: TPGroup) -> list:
    """This step's messages, the same list in the same order on every rank.

    Rank 0 reads its socket (blocking while idle) and broadcasts what it got; the other
    ranks receive that broadcast, so every rank schedules identically. With several
    ranks an idle leader still broadcasts (an empty list) every second, which keeps
    the followers' collectives inside their timeout.
    """
    if tp_group.size == 1:
        return inbox.recv_all() if scheduler.has_work() else [inbox.recv()]
    if inbox is None:
        return decode(tp_group.broadcast_bytes(None))
    if scheduler.has_work():
        messages = inbox.recv_all()
    else:
        first = inbox.recv(timeout_ms=_IDLE_HEARTBEAT_MS)
        messages = [] if first is None else [first, *inbox.recv_all()]
    tp_group.broadcast_bytes(encode(messages))
    return messages


def _dispatch(scheduler: Scheduler, msg):
    if isinstance(msg, TokenizedGenerateReq):
        error = scheduler.add_request(msg)
        return [error] if error is not None else None
    if isinstance(msg, AbortReq):
        out = scheduler.abort(msg.rid)
        return [out] if out is not None else None
    if isinstance(msg, FlushCacheReq):
        return FlushCacheDone(scheduler.flush_cache())
    if isinstance(msg, GetInternalStateReq):
        return scheduler.internal_state()
    raise TypeError(f"scheduler got an unexpected message {type(msg).__name__}")
