"""Start and stop the runtime's processes on this node: scheduler ranks and, on the head node,
the detokenizer.

Each child reports ready (``srt.runtime.child``) before ``Runtime`` returns; one that
fails or dies during start-up stops everything with its traceback instead of a hang.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from multiprocessing.connection import Connection

from srt.model_loader.default_model import resolve_model_path
from srt.runtime.child import ChildSpec, read_report, start_child
from srt.runtime.ipc import IpcEndpoints
from srt.runtime.messages import ChildReady, SchedulerInfo
from srt.server_args import ServerArgs

logger = logging.getLogger(__name__)

_READY_TIMEOUT_S = 600


class Runtime:
    """Every runtime process of this node. Node 0 (the head) also runs the detokenizer (unless
    ``skip_tokenizer_init``); other nodes (``--nnodes``) run only their scheduler ranks."""

    def __init__(self, server_args: ServerArgs) -> None:
        self.server_args = server_args
        self.is_head = server_args.node_rank == 0
        self.model_path = resolve_model_path(server_args.model_path)
        self.tokenizer_path = resolve_model_path(server_args.tokenizer_path) if server_args.tokenizer_path else self.model_path
        self.endpoints, self._ipc_dir = IpcEndpoints.in_new_dir(server_args.dp_size, not server_args.skip_tokenizer_init)
        self.processes: dict[str, subprocess.Popen] = {}
        try:
            self.scheduler_infos = self._start_children()
        except BaseException:
            self.shutdown()
            raise

    @property
    def info(self) -> SchedulerInfo:
        """What the first scheduler rank reported (every replica serves the same model)."""
        return self.scheduler_infos[scheduler_name(0, 0, self.server_args.dp_size)]

    def _start_children(self) -> dict[str, SchedulerInfo]:
        args = self.server_args
        ranks_per_node = args.tp_size // args.nnodes
        local_ranks = range(args.node_rank * ranks_per_node, (args.node_rank + 1) * ranks_per_node)
        threads = max(1, (os.cpu_count() or 1) // (ranks_per_node * args.dp_size))
        pipes: dict[str, Connection] = {}

        def spawn(module: str, name: str, **options) -> None:
            spec = ChildSpec(name, args, self.endpoints, options)
            self.processes[name], pipes[name] = start_child(module, spec)

        for dp_rank in range(args.dp_size):
            # Each replica is its own TP group with its own rendezvous.
            dist_init = f"tcp://{args.dist_init_addr}" if args.dist_init_addr and dp_rank == 0 else f"tcp://127.0.0.1:{_free_port()}"
            for tp_rank in local_ranks:
                local_index = dp_rank * ranks_per_node + tp_rank - local_ranks.start
                spawn(
                    "srt.scheduler",
                    scheduler_name(dp_rank, tp_rank, args.dp_size),
                    model_path=self.model_path,
                    tokenizer_path=self.tokenizer_path,
                    dp_rank=dp_rank,
                    tp_rank=tp_rank,
                    gpu_id=args.base_gpu_id + local_index,
                    dist_init_method=dist_init,
                    num_threads=threads,
                )
        if self.is_head and self.endpoints.has_detokenizer:
            spawn("srt.detokenizer", "detokenizer", tokenizer_path=self.tokenizer_path)
        reports = {name: self._wait_ready(name, pipe) for name, pipe in pipes.items()}
        return {name: report.info for name, report in reports.items() if report.info is not None}

    def _wait_ready(self, name: str, pipe: Connection) -> ChildReady:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if pipe.poll(0.2):
                    report = read_report(pipe)
                    if not isinstance(report, ChildReady):
                        raise RuntimeError(f"{name} failed to start: {report.error}")
                    return report
                dead = self.dead_children()
                if dead:
                    raise RuntimeError(f"runtime process(es) died during start-up: {', '.join(dead)}")
            raise TimeoutError(f"{name} was not ready after {_READY_TIMEOUT_S}s")
        finally:
            pipe.close()

    def dead_children(self) -> list[str]:
        return [f"{name} (exit code {p.returncode})" for name, p in self.processes.items() if p.poll() is not None]

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop every child (SIGTERM, then SIGKILL after ``timeout_s``) and remove the socket directory."""
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in self.processes.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)


def scheduler_name(dp_rank: int, tp_rank: int, dp_size: int) -> str:
    return f"scheduler-DP{dp_rank}-TP{tp_rank}" if dp_size > 1 else f"scheduler-TP{tp_rank}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
