"""Start and stop the runtime's processes: scheduler ranks, detokenizer, and the TokenizerManager.

Children are spawned (not forked), report ready over a pipe, die with their parent,
and a crash in any of them is reported with its traceback instead of a hang.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import socket
import time
from multiprocessing.connection import Connection

from transformers import AutoTokenizer

from srt.model_loader.default_model import resolve_model_path
from srt.detokenizer.process import run_detokenizer
from srt.runtime.ipc import IpcEndpoints
from srt.runtime.child import run_child
from srt.scheduler.process import run_scheduler
from srt.server_args import ServerArgs
from srt.tokenizer_manager.manager import RuntimeInfo, TokenizerManager

logger = logging.getLogger(__name__)

_READY_TIMEOUT_S = 600


class Runtime:
    """Every process of this node. Node 0 (the head) also runs the detokenizer and the
    TokenizerManager; other nodes (``--nnodes``) run only their scheduler ranks."""

    def __init__(self, server_args: ServerArgs) -> None:
        self.server_args = server_args
        self.is_head = server_args.node_rank == 0
        self.model_path = resolve_model_path(server_args.model_path)
        self.tokenizer_path = resolve_model_path(server_args.tokenizer_path) if server_args.tokenizer_path else self.model_path
        self.endpoints, self._ipc_dir = IpcEndpoints.in_new_dir(server_args.dp_size)
        self.processes: dict[str, mp.Process] = {}
        self.tokenizer_manager: TokenizerManager | None = None
        try:
            self.reports = self._start_children()
            if self.is_head:
                tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path, trust_remote_code=server_args.trust_remote_code)
        except BaseException:
            self.shutdown()
            raise
        if self.is_head:
            first = self.reports[_scheduler_name(0, 0, server_args.dp_size)]
            self.info = RuntimeInfo(first["max_total_tokens"], first["max_req_input_len"], first["context_length"], first["vocab_size"])
            self.tokenizer_manager = TokenizerManager(
                tokenizer, self.endpoints, self.info, self.dead_children, server_args.load_balance_method
            )

    def _start_children(self) -> dict[str, dict]:
        args = self.server_args
        ctx = mp.get_context("spawn")
        ranks_per_node = args.tp_size // args.nnodes
        local_ranks = range(args.node_rank * ranks_per_node, (args.node_rank + 1) * ranks_per_node)
        threads = max(1, (os.cpu_count() or 1) // (ranks_per_node * args.dp_size))
        pipes: dict[str, Connection] = {}

        def spawn(name: str, target, *target_args) -> None:
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=run_child, args=(name, args.log_level, writer, target, *target_args), name=name, daemon=True)
            proc.start()
            writer.close()
            self.processes[name] = proc
            pipes[name] = reader

        for dp_rank in range(args.dp_size):
            # Each replica is its own TP group with its own rendezvous.
            dist_init = f"tcp://{args.dist_init_addr}" if args.dist_init_addr and dp_rank == 0 else f"tcp://127.0.0.1:{_free_port()}"
            for tp_rank in local_ranks:
                local_index = dp_rank * ranks_per_node + tp_rank - local_ranks.start
                spawn(
                    _scheduler_name(dp_rank, tp_rank, args.dp_size),
                    run_scheduler,
                    args,
                    self.model_path,
                    self.tokenizer_path,
                    self.endpoints,
                    dp_rank,
                    tp_rank,
                    args.base_gpu_id + local_index,
                    dist_init,
                    threads,
                )
        if self.is_head:
            spawn(
                "detokenizer",
                run_detokenizer,
                self.tokenizer_path,
                args.trust_remote_code,
                args.skip_tokenizer_init,
                self.endpoints,
            )
        return {name: self._wait_ready(name, pipe) for name, pipe in pipes.items()}

    def _wait_ready(self, name: str, pipe: Connection) -> dict:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if pipe.poll(0.2):
                try:
                    report = pipe.recv()
                except EOFError:
                    report = {"status": "error", "error": f"{name} exited during start-up"}
                if report.get("status") != "ready":
                    raise RuntimeError(f"{name} failed to start: {report.get('error')}")
                return report
            dead = self.dead_children()
            if dead:
                raise RuntimeError(f"runtime process(es) died during start-up: {', '.join(dead)}")
        raise TimeoutError(f"{name} was not ready after {_READY_TIMEOUT_S}s")

    def dead_children(self) -> list[str]:
        return [f"{name} (exit code {p.exitcode})" for name, p in self.processes.items() if not p.is_alive()]

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop every child (SIGTERM, then SIGKILL after ``timeout_s``) and remove the socket directory."""
        for proc in self.processes.values():
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in self.processes.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.processes.clear()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)


def _scheduler_name(dp_rank: int, tp_rank: int, dp_size: int) -> str:
    return f"scheduler-DP{dp_rank}-TP{tp_rank}" if dp_size > 1 else f"scheduler-TP{tp_rank}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
