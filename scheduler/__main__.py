"""``python -m srt.scheduler``: one scheduler / model-worker rank, started by ``srt.runtime.Runtime``."""

from srt.runtime.child import run_child
from srt.scheduler.process import run_scheduler

run_child(run_scheduler)
