"""The scheduler process: ``recv → dispatch → step → send`` around one Scheduler.

An idle scheduler blocks on its socket; a busy one only polls between steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import zmq

from srt.model_executor.model_runner import ModelRunner
from srt.model_loader.tokenizer import load_tokenizer
from srt.platform.device import resolve_device
from srt.platform.distributed import TPGroup, init_tp_group
from srt.platform.host_memory import HeapTrimmer, fix_mmap_threshold
from srt.runtime.child import ChildSpec
from srt.runtime.codec import decode, encode
from srt.runtime.ipc import Receiver, Sender
from srt.runtime.messages import (
    AbortReq,
    ChildReady,
    FlushCacheReply,
    FlushCacheReq,
    GetInternalStateReq,
    GrammarsReady,
    InternalStateReply,
    LoadLoRAAdapterReq,
    LoRAAdapterReply,
    SchedulerInfo,
    TokenizedBatch,
    TokenizedEmbeddingReq,
    TokenizedGenerateReq,
    UnloadLoRAAdapterReq,
)
from srt.scheduler.embedding import EncoderScheduler
from srt.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)

_IDLE_HEARTBEAT_MS = 1000
_COMPILE_POLL_MS = 2  # how often an otherwise idle rank 0 looks whether a grammar compile has ended


def run_scheduler(spec: ChildSpec, report: Callable[[ChildReady], None]) -> None:
    fix_mmap_threshold()  # before the first large allocation
    args, options = spec.server_args, spec.options
    tp_rank, gpu_id = options["tp_rank"], options["gpu_id"]
    torch.set_num_threads(options["num_threads"])
    tp_group = init_tp_group(tp_rank, args.tp_size, resolve_device(args.device, gpu_id), options["dist_init_method"])
    runner = ModelRunner(args, options["model_path"], tp_group, gpu_id=gpu_id)
    # Stop strings are matched here, on decoded text.
    tokenizer = None if args.skip_tokenizer_init else load_tokenizer(options["tokenizer_path"], args.trust_remote_code)
    scheduler = EncoderScheduler(args, runner) if runner.is_encoder else Scheduler(args, runner, tokenizer)
    task = runner.task
    is_leader = tp_rank == 0
    context = zmq.Context()
    inbox = Receiver(context, spec.endpoints.scheduler_inputs[options["dp_rank"]]) if is_leader else None
    outbox = Sender(context, spec.endpoints.scheduler_output) if is_leader else None
    info = SchedulerInfo(
        max_total_tokens=runner.plan.max_total_tokens,
        max_req_input_len=scheduler.max_req_input_len,
        context_length=scheduler.context_length,
        vocab_size=scheduler.vocab_size,
        weight_bytes=runner.weight_bytes(),
        task=task.kind,
        output_dim=runner.output_dim if task.is_pooling else 0,
        pooling=task.pooling,
        normalize=task.normalize,
        matryoshka=task.matryoshka,
        labels=task.labels,
        image_refusal=runner.image_refusal,
    )
    report(ChildReady(info))
    logger.info("scheduler rank %d ready", tp_rank)
    trimmer = HeapTrimmer()
    while True:
        for msg in _next_messages(scheduler, inbox, tp_group):
            reply = _dispatch(scheduler, msg)
            if reply is not None and is_leader:
                outbox.send(reply)
        scheduler.step()
        trimmer.after_step()
        for outputs in scheduler.take_outputs():
            if is_leader:
                outbox.send(outputs)


def _next_messages(scheduler: Scheduler | EncoderScheduler, inbox: Receiver | None, tp_group: TPGroup) -> list:
    """This step's messages, the same list in the same order on every rank.

    Rank 0 reads its socket (blocking while idle) and adds which grammar compiles have
    ended; with several ranks it broadcasts the list and the other ranks receive it, so
    every rank schedules identically. An idle rank 0 still broadcasts (an empty list)
    every second, which keeps the followers' collectives inside their timeout.
    """
    if inbox is None:
        return decode(tp_group.broadcast_bytes(None))
    if scheduler.has_work():
        messages = inbox.recv_all()
    elif tp_group.size == 1 and not scheduler.compiling():
        messages = [inbox.recv(), *inbox.recv_all()]  # all that arrived together: one batch
    else:
        first = inbox.recv(timeout_ms=_COMPILE_POLL_MS if scheduler.compiling() else _IDLE_HEARTBEAT_MS)
        messages = [] if first is None else [first, *inbox.recv_all()]
    if ready := scheduler.ready_grammars():
        messages.append(GrammarsReady(ready))
    if tp_group.size > 1:
        tp_group.broadcast_bytes(encode(messages))
    return messages


def _dispatch(scheduler: Scheduler | EncoderScheduler, msg) -> FlushCacheReply | InternalStateReply | LoRAAdapterReply | None:
    """Apply one message; a control request's reply is returned."""
    if isinstance(msg, TokenizedBatch):
        for req in msg.reqs:
            _dispatch(scheduler, req)
    elif isinstance(msg, TokenizedGenerateReq):
        scheduler.add_request(msg)
    elif isinstance(msg, TokenizedEmbeddingReq):
        scheduler.add_embedding_request(msg)
    elif isinstance(msg, AbortReq):
        scheduler.abort(msg.rid)
    elif isinstance(msg, GrammarsReady):
        scheduler.admit_grammars(msg.rids)
    elif isinstance(msg, FlushCacheReq):
        return FlushCacheReply(msg.request_id, scheduler.flush_cache())
    elif isinstance(msg, GetInternalStateReq):
        return InternalStateReply(msg.request_id, scheduler.internal_state())
    elif isinstance(msg, LoadLoRAAdapterReq):
        return scheduler.load_lora(msg)
    elif isinstance(msg, UnloadLoRAAdapterReq):
        return scheduler.unload_lora(msg)
    else:
        raise TypeError(f"scheduler got an unexpected message {type(msg).__name__}")
    return None
