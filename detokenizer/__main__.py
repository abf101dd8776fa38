"""``python -m srt.detokenizer``: the detokenizer process, started by ``srt.runtime.Runtime``."""

from srt.detokenizer.process import run_detokenizer
from srt.runtime.child import run_child

run_child(run_detokenizer)
