"""How many threads a CPU forward uses, tuned while serving from measured decode steps.

A serving box is rarely quiet. When another process keeps one of the cores busy, an OpenMP
team that still counts on every core waits at each barrier for its thread that shares a
core with the intruder: a 2-core decode step measured 3-4x slower, not the 2x the lost core
explains. One thread fewer avoids the shared core. No thread count is right for every
moment, so the tuner measures: every so often a few decode steps run with one thread more
or fewer than now, and the faster count is kept. Trials that lose back off (the interval
doubles, up to ``MAX_INTERVAL`` steps), so a quiet machine pays a fraction of a percent;
step times far from those at the last decision bring the next trial forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

INTERVAL = 64  # decode steps between trials, at first and after a change
MAX_INTERVAL = 4096
# Below the full team a lost trial backs off less: when the other process is gone, its step
# times at fewer threads hardly change (it was not sharing their cores), so only a trial finds out.
MAX_INTERVAL_BELOW_FULL = 512
TRIAL_STEPS = 6  # steps measured per side of a comparison
MARGIN = 0.08  # a trial must be this much faster to be kept (step times are noisy)
DRIFT = 0.3  # steps this much slower or faster than at the last decision bring the next trial forward


class ThreadTuner:
    def __init__(self, max_threads: int, set_threads: Callable[[int], None] = torch.set_num_threads) -> None:
        self.max_threads = max_threads
        self.threads = max_threads
        self._set_threads = set_threads
        self._interval = INTERVAL
        self._countdown = INTERVAL
        self._direction = -1  # the next trial's step: fewer threads first (what contention needs)
        self._baseline: list[float] = []  # the last steps at ``threads``
        self._trial: list[float] = []  # steps at ``threads + direction`` during a trial
        self._bucket: int | None = None  # batch-size bucket of the steps being compared
        self._settled: float | None = None  # median step at the last decision (current bucket)
        self.trying: int | None = None  # the thread count under trial

    def observe_decode(self, seconds: float, batch_size: int) -> None:
        """Record one decode step of ``batch_size`` requests that took ``seconds``."""
        bucket = batch_size.bit_length()  # powers of two share a bucket: similar step times
        if bucket != self._bucket:
            self._new_bucket(bucket)
        if self.trying is not None:
            self._trial.append(seconds)
            if len(self._trial) == TRIAL_STEPS:
                self._finish_trial()
            return
        self._baseline = [*self._baseline[1 - TRIAL_STEPS :], seconds]
        if len(self._baseline) < TRIAL_STEPS:
            return
        now = _median(self._baseline)
        if self._settled is None:
            self._settled = now
        elif abs(now - self._settled) > DRIFT * self._settled:  # the machine changed: look again now
            self._settled, self._countdown, self._interval = now, 0, INTERVAL
        self._countdown -= 1
        if self._countdown <= 0:
            self._start_trial()

    def _new_bucket(self, bucket: int) -> None:
        """Another batch size: earlier step times say nothing about the new ones."""
        if self.trying is not None:
            self._set_threads(self.threads)
            self.trying = None
        self._bucket, self._baseline, self._trial, self._settled = bucket, [], [], None

    def _start_trial(self) -> None:
        candidate = self.threads + self._direction
        if not 1 <= candidate <= self.max_threads:
            self._direction = -self._direction
            candidate = self.threads + self._direction
        if not 1 <= candidate <= self.max_threads:  # one thread allowed: nothing to tune
            self._countdown = MAX_INTERVAL
            return
        self.trying, self._trial = candidate, []
        self._set_threads(candidate)

    def _finish_trial(self) -> None:
        candidate, self.trying = self.trying, None
        before, after = _median(self._baseline), _median(self._trial)
        if after < (1 - MARGIN) * before:
            logger.info("CPU threads %d -> %d: decode step %.1f ms -> %.1f ms", self.threads, candidate, 1e3 * before, 1e3 * after)
            self.threads, self._baseline, self._settled = candidate, list(self._trial), after
            self._interval = INTERVAL  # keep going the same way soon: another step may pay too
        else:
            self._set_threads(self.threads)
            self._direction = -self._direction
            self._interval = min(2 * self._interval, MAX_INTERVAL if self.threads == self.max_threads else MAX_INTERVAL_BELOW_FULL)
            self._settled = before
        self._trial = []
        self._countdown = self._interval


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
