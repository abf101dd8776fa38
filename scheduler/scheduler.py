"""The scheduler: continuous batching over one ModelRunner.

Each ``step`` either prefills what fits (new prompts, the next chunk of a long one,
retracted requests coming back) or decodes one token for every running request:
``pick batch → forward → sample → finish / cache``. The phases live beside this file
(``prefill``, ``decode``, ``output``, ``memory``); the scheduler process
(``process.py``) feeds it messages and ships what ``take_outputs`` returns.
"""

from __future__ import annotations

import itertools
import logging
import random
import time

import torch

from srt.lora.adapter import AdapterError
from srt.mem_cache.base_prefix_cache import PrefixCache
from srt.mem_cache.chunk_cache import ChunkCache
from srt.mem_cache.radix_cache import RadixCache
from srt.model_executor.forward_batch import ForwardBatch
from srt.model_executor.model_runner import ModelRunner
from srt.platform.cpu_threads import ThreadTuner
from srt.platform.device import default_chunked_prefill_size, in_host_memory
from srt.runtime.messages import (
    BatchEmbeddingOut,
    BatchTokenOut,
    EmbeddingOutput,
    FinishAbort,
    InternalState,
    LoadLoRAAdapterReq,
    LoRAAdapterReply,
    TokenizedEmbeddingReq,
    TokenizedGenerateReq,
    UnloadLoRAAdapterReq,
)
from srt.sampling.grammar.backend import GrammarKey, create_grammar_backend
from srt.sampling.grammar.mask_filler import MaskFiller
from srt.sampling.sampling_params import SamplingParams
from srt.scheduler.decode import DecodeScheduler
from srt.scheduler.embedding import DecoderPooling, refused, refused_generation
from srt.scheduler.grammar_queue import GrammarQueue
from srt.scheduler.images import SchedulerImages
from srt.scheduler.memory import RequestMemory
from srt.scheduler.output import OutputProcessor
from srt.scheduler.prefill import PrefillAdmission
from srt.scheduler.req import Req
from srt.server_args import ServerArgs

logger = logging.getLogger(__name__)

_GRAMMAR_CACHE_SIZE = 1024  # compiled grammars kept (xgrammar's are tens of KB to a few MB each)


class Scheduler:
    def __init__(self, server_args: ServerArgs, runner: ModelRunner, tokenizer=None) -> None:
        self.args = server_args
        self.runner = runner
        self.cache: PrefixCache = ChunkCache(runner.allocator) if server_args.disable_radix_cache else RadixCache(runner.allocator)
        self.memory = RequestMemory(runner.req_to_token_pool, runner.allocator, self.cache)
        self.context_length = runner.plan.context_length
        # A request must leave room for at least one generated token.
        self.max_req_input_len = min(self.context_length, runner.plan.max_total_tokens) - 1
        chunk = server_args.chunked_prefill_size
        if chunk is None:
            chunk = default_chunked_prefill_size(runner.device)
        self.vocab_size = runner.shape.vocab_size
        self.eos_ids = _eos_ids([runner.config, runner.config.get_text_config(), runner.generation_config], tokenizer)
        self._rng = random.Random(server_args.random_seed)

        self.decode = DecodeScheduler(self.memory)
        self.prefill = PrefillAdmission(
            server_args, self.memory, self.decode, runner.plan.max_running_requests, chunk if chunk > 0 else None
        )
        self.output = OutputProcessor(tokenizer, self.context_length, self.vocab_size)
        backend = None if runner.task.is_pooling else create_grammar_backend(
            server_args.grammar_backend,
            tokenizer,
            self.vocab_size,
            self.eos_ids,
            any_whitespace=not server_args.constrained_json_disable_any_whitespace,
        )
        self.grammars = GrammarQueue(backend, _GRAMMAR_CACHE_SIZE) if backend else None
        self.masks = MaskFiller(backend, pin_memory=not in_host_memory(runner.device)) if backend else None
        self.pooling = DecoderPooling(runner) if runner.task.is_pooling else None
        self.images = SchedulerImages(runner)
        tuned = in_host_memory(runner.device) and not server_args.disable_cpu_thread_tuning and torch.get_num_threads() > 1
        self.thread_tuner = ThreadTuner(torch.get_num_threads()) if tuned else None
        self.pooled: list[EmbeddingOutput] = []  # pooling results (and refusals) not sent yet
        self.refusals: list[BatchTokenOut] = []
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self._decode_steps = 0
        self._last_log = time.monotonic()
        self._generated_since_log = 0

    # ---- requests in and out ------------------------------------------------------------

    def add_request(self, msg: TokenizedGenerateReq) -> None:
        """Queue a request the TokenizerManager has checked."""
        if self.pooling is not None:  # the TokenizerManager refuses these; a direct caller gets told too
            self.refusals.append(refused_generation(msg, type(self.runner.model).__name__))
            return
        params = msg.sampling_params
        stop_ids = list(params.stop_token_ids) + ([] if params.ignore_eos else self.eos_ids)
        seed = params.seed if params.seed is not None else self._rng.randrange(2**31)
        req = Req(
            msg.rid, list(msg.input_ids), params, seed, stop_ids, msg.return_logprob, msg.top_logprobs_num, msg.stream,
            msg.logprob_start_len,
        )  # fmt: skip
        if msg.lora_name is not None:
            lora = self.runner.lora
            if lora is None or msg.lora_name not in lora.ids:  # the front checks it; an unload may have raced it
                req.finish_reason = FinishAbort(f"LoRA adapter {msg.lora_name!r} is not loaded", 400)
                self.output.emit(req)
                return
            req.lora_name, req.lora_id = msg.lora_name, lora.ids[msg.lora_name]
        refusal = self.images.attach(req, msg.multimodal)
        if refusal is not None:
            req.finish_reason = FinishAbort(refusal, 400)
            self.output.emit(req)
            return
        if params.constraint is None:
            self.waiting.append(req)
        elif self.grammars is None:  # the TokenizerManager refuses these; a direct caller gets told too
            req.finish_reason = FinishAbort(f"{params.constraint[0]} needs a grammar backend (--grammar-backend)", 400)
            self.output.emit(req)
        else:
            self.grammars.add(req, GrammarKey(*params.constraint))

    def add_embedding_request(self, msg: TokenizedEmbeddingReq) -> None:
        """Queue a pooling request: its prompt is prefilled, pooled, and it finishes."""
        failure = refused(msg, self.runner)
        if failure is not None:
            self.pooled.append(failure)
            return
        params = SamplingParams(max_new_tokens=0)
        req = Req(msg.rid, list(msg.input_ids), params, 0, [], stream=False, pooling=self.runner.task.pooling)
        self.waiting.append(req)

    def ready_grammars(self) -> list[str]:
        """Requests whose grammar compile is over (asked on rank 0, which tells the others)."""
        return self.grammars.ready_rids() if self.grammars else []

    def admit_grammars(self, rids: list[str]) -> None:
        """Move these requests from the grammar queue to the waiting queue (a failed compile ends them)."""
        for req in self.grammars.take(rids):
            if req.finished:
                self.output.emit(req)
            else:
                self.waiting.append(req)

    def compiling(self) -> bool:
        return bool(self.grammars)

    def abort(self, rid: str) -> None:
        """Drop a request wherever it is, freeing its memory now; its last output says so."""
        req = next((r for r in self.waiting + self.running if r.rid == rid), None)
        if req is not None:
            (self.waiting if req in self.waiting else self.running).remove(req)
        elif self.prefill.chunked is not None and self.prefill.chunked.rid == rid:
            req, self.prefill.chunked = self.prefill.chunked, None
        elif self.grammars is not None:
            req = self.grammars.abort(rid)
        if req is not None:
            req.finish_reason = FinishAbort("aborted")
            self.memory.release(req)
            self.output.emit(req)

    def load_lora(self, msg: LoadLoRAAdapterReq) -> LoRAAdapterReply:
        if self.runner.lora is None:
            return LoRAAdapterReply(msg.request_id, "this server runs without --enable-lora")
        try:
            self.runner.lora.load(msg.lora_name, msg.lora_path)
        except (AdapterError, OSError, ValueError) as e:
            return LoRAAdapterReply(msg.request_id, str(e))
        return LoRAAdapterReply(msg.request_id)

    def unload_lora(self, msg: UnloadLoRAAdapterReq) -> LoRAAdapterReply:
        """Forget an adapter and free its cached prefixes; refused while a request uses it."""
        lora = self.runner.lora
        if lora is None or msg.lora_name not in lora.ids:
            return LoRAAdapterReply(msg.request_id, f"LoRA adapter {msg.lora_name!r} is not loaded")
        queued = self.grammars.reqs() if self.grammars else []
        in_flight = [*self.waiting, *self.running, *queued, *([self.prefill.chunked] if self.prefill.chunked else [])]
        users = [r for r in in_flight if r.lora_name == msg.lora_name]
        if users:
            return LoRAAdapterReply(msg.request_id, f"LoRA adapter {msg.lora_name!r} is in use by {len(users)} request(s)")
        self.cache.drop_namespace(lora.unload(msg.lora_name))
        return LoRAAdapterReply(msg.request_id)

    def take_outputs(self) -> list[BatchTokenOut | BatchEmbeddingOut]:
        """What to send since the last call: token outputs, and pooling results."""
        tokens = self.output.take()
        messages: list[BatchTokenOut | BatchEmbeddingOut] = self.refusals + ([tokens] if tokens.outputs else [])
        if self.pooled:
            messages.append(BatchEmbeddingOut(self.pooled))
        self.refusals, self.pooled = [], []
        return messages

    def flush_cache(self) -> bool:
        """Empty the prefix cache; refused (False) while requests are in flight."""
        if self.has_work():
            return False
        self.cache.reset()
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefill.chunked)

    def internal_state(self) -> InternalState:
        allocator, pool = self.runner.allocator, self.runner.req_to_token_pool
        return InternalState(
            free_kv_slots=allocator.available_size(),
            total_kv_slots=allocator.size,
            cached_tokens=self.cache.total_size(),
            evictable_tokens=self.cache.evictable_size(),
            running_requests=len(self.running) + (self.prefill.chunked is not None),
            waiting_requests=len(self.waiting) + (len(self.grammars) if self.grammars else 0),
            free_request_slots=pool.available_size(),
            total_request_slots=pool.size,
            num_retractions=self.decode.num_retractions,
            cache_hit_rate=self.prefill.cache_hit_rate,
        )

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> None:
        """Prefill what fits, else decode every running request; with ``--enable-mixed-chunk``
        the running requests decode in the same forward as the prefill (their inter-token
        latency no longer waits for other requests' prompts)."""
        prefill = self.prefill.schedule(self.waiting, self.running)
        decode = []
        if self.running and (not prefill or self.args.enable_mixed_chunk):
            decode = self.decode.schedule(self.running, self.waiting)
        if prefill or decode:
            started = time.perf_counter()
            self._run(prefill, decode)
            if self.thread_tuner is not None and decode and not prefill:
                self.thread_tuner.observe_decode(time.perf_counter() - started, len(decode))

    def _run(self, prefill: list[Req], decode: list[Req]) -> None:
        if self.images.vision is not None and prefill:
            prefill = self._encode_images(prefill)
            if not prefill and not decode:
                return
        batch = prefill + decode
        forward_batch = self._forward_batch(batch)
        # Requests whose whole prompt (or decode token) is in the cache after this forward get a next
        # token from their last logits row; a request in the middle of a chunked prefill does not.
        sampled = [(i, r) for i, r in enumerate(batch) if r.pending_len == r.extend_len]
        masks = self.masks.start([r.grammar for _, r in sampled]) if self.masks else None  # filled during the forward
        logits = self.runner.forward(forward_batch)  # a row per entry of each req.logit_positions
        ends = list(itertools.accumulate(len(r.logit_positions) for r in batch))
        if any(r.wants_input_logprobs for r in prefill):
            self.output.add_input_logprobs(prefill, logits, ends)
        for req in batch:
            req.kv_len += req.extend_len
        for req in prefill:
            self.memory.cache_prefix(req)
        self.images.release(prefill)
        if self.pooling is not None:  # prefill only: pooled requests finish, none decodes
            done, outputs = self.pooling.collect(batch, logits, ends)
            for req in done:
                self.memory.release(req)
            self.pooled.extend(outputs)
            self._log_prefill(prefill)
            return
        if sampled:
            rows = logits[[ends[i] - 1 for i, _ in sampled]]
            for req in self.output.sample([r for _, r in sampled], rows, masks.result() if masks else None):
                if req in self.running:
                    self.running.remove(req)
                self.memory.release(req)
        if prefill:
            self.running.extend(r for i, r in sampled if i < len(prefill) and not r.finished)
            self._log_prefill(prefill)
        if decode:
            self._decode_steps += 1
            self._generated_since_log += len(decode)
            if self._decode_steps % self.args.decode_log_interval == 0:
                self._log_decode()

    def _encode_images(self, prefill: list[Req]) -> list[Req]:
        """The prefill without the requests whose images the vision tower could not encode (they end with a 400)."""
        for req, why in self.images.encode(prefill):
            if self.prefill.chunked is req:
                self.prefill.chunked = None
            self.memory.unreserve(req)
            req.finish_reason = FinishAbort(why, 400)
            self.memory.release(req)
            self.output.emit(req)
        return [r for r in prefill if not r.finished]

    def _forward_batch(self, batch: list[Req]) -> ForwardBatch:
        device = self.runner.device
        table = self.runner.req_to_token_pool.req_to_token
        input_ids, positions, logit_rows = [], [], []
        for req in batch:
            fill = req.fill_ids
            start, end = req.kv_len, req.kv_len + req.extend_len
            req.logit_positions = range(end - 1, end)  # the last new token's logits give the next token
            if req.pooling == "mean":
                req.logit_positions = range(start, end)  # every token's hidden state is pooled
            if req.wants_input_logprobs:
                # ...and, for prompt logprobs, every position from the one before logprob_start_len on.
                req.logit_positions = range(min(max(start, req.first_logit_position), end - 1), end)
            logit_rows.extend(len(positions) + p - start for p in req.logit_positions)
            input_ids.extend(fill[start:end])
            positions.extend(range(start, end))
        rows = torch.tensor([r.req_pool_idx for r in batch], dtype=torch.int64, device=device)
        position_t = torch.tensor(positions, dtype=torch.int64, device=device)
        row_per_token = torch.repeat_interleave(rows, torch.tensor([r.extend_len for r in batch], device=device))
        image_rows, image_features, mrope_positions = self.images.forward_fields(batch) if self.images.vision else (None,) * 3
        return ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.int64, device=device),
            positions=position_t,
            out_cache_loc=table[row_per_token, position_t],
            req_pool_indices=rows,
            seq_lens=torch.tensor([r.kv_len + r.extend_len for r in batch], dtype=torch.int64, device=device),
            prefix_lens=[r.kv_len for r in batch],
            extend_lens=[r.extend_len for r in batch],
            req_to_token=table,
            kv_cache=self.runner.kv_cache,
            logits_indices=torch.tensor(logit_rows, dtype=torch.int64, device=device),
            lora_adapters=[r.lora_name for r in batch] if any(r.lora_name for r in batch) else None,
            image_rows=image_rows,
            image_features=image_features,
            mrope_positions=mrope_positions,
        )

    # ---- logging -------------------------------------------------------------------------

    def _log_prefill(self, batch: list[Req]) -> None:
        logger.info(
            "Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, #running-req: %d, #queue-req: %d",
            len(batch),
            sum(r.extend_len for r in batch),
            sum(r.kv_len - r.extend_len for r in batch),
            self.memory.token_usage(),
            len(self.running),
            len(self.waiting),
        )

    def _log_decode(self) -> None:
        now = time.monotonic()
        throughput = self._generated_since_log / max(now - self._last_log, 1e-6)
        self._last_log, self._generated_since_log = now, 0
        logger.info(
            "Decode batch. #running-req: %d, #token: %d, token usage: %.2f, cache hit rate: %.1f%%, gen throughput (token/s): %.2f, #queue-req: %d",
            len(self.running),
            self.runner.allocator.size - self.runner.allocator.available_size(),
            self.memory.token_usage(),
            100 * self.prefill.cache_hit_rate,
            throughput,
            len(self.waiting),
        )


def _eos_ids(configs: list, tokenizer) -> list[int]:
    """EOS ids from the model and generation configs, plus the tokenizer's."""
    ids: set[int] = set()
    for config in configs:
        source = getattr(config, "eos_token_id", None)
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(source)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)
