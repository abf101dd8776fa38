"""The CPU thread tuner, driven with step times of a simulated machine: quiet, a core taken by
another process, quiet again."""

from __future__ import annotations

from srt.platform.cpu_threads import INTERVAL, MAX_INTERVAL, MAX_INTERVAL_BELOW_FULL, ThreadTuner

# Decode step seconds by thread count, on 4 cores. Contended: one core is busy elsewhere, so a
# full team waits on the thread that shares it.
QUIET = {4: 0.010, 3: 0.013, 2: 0.019, 1: 0.036}
CONTENDED = {4: 0.040, 3: 0.014, 2: 0.020, 1: 0.037}


class Machine:
    def __init__(self) -> None:
        self.threads = 4
        self.history: list[int] = []

    def set_threads(self, n: int) -> None:
        self.threads = n

    def run(self, tuner: ThreadTuner, costs: dict[int, float], steps: int, batch_size: int = 8) -> float:
        total = 0.0
        for _ in range(steps):
            seconds = costs[self.threads]
            total += seconds
            self.history.append(self.threads)
            tuner.observe_decode(seconds, batch_size)
        return total


def test_tuner_follows_contention_and_returns() -> None:
    machine = Machine()
    tuner = ThreadTuner(4, machine.set_threads)
    quiet = machine.run(tuner, QUIET, 4000)
    assert tuner.threads == 4
    # Trials back off when they lose: a quiet machine pays little for them.
    assert quiet < 1.02 * 4000 * QUIET[4]
    assert tuner._interval >= MAX_INTERVAL // 2

    machine.run(tuner, CONTENDED, 2 * TRIAL_WINDOW)  # the slowdown itself brings a trial forward
    assert tuner.threads == 3
    contended = machine.run(tuner, CONTENDED, 2000)
    assert contended < 1.1 * 2000 * CONTENDED[3]

    # Fewer threads run as fast as before once the other process is gone: only trials find out,
    # and below the full team they back off to at most MAX_INTERVAL_BELOW_FULL steps.
    machine.run(tuner, QUIET, 2 * MAX_INTERVAL_BELOW_FULL + 2 * TRIAL_WINDOW)
    assert tuner.threads == 4


def test_batch_size_change_ends_a_trial_and_restores_the_threads() -> None:
    machine = Machine()
    tuner = ThreadTuner(4, machine.set_threads)
    steps = 0
    while tuner.trying is None:
        machine.run(tuner, QUIET, 1)
        steps += 1
    assert machine.threads == tuner.trying == 3 and steps <= INTERVAL + 6
    machine.run(tuner, QUIET, 1, batch_size=64)  # another bucket: nothing learnt applies
    assert tuner.trying is None and machine.threads == 4


def test_one_thread_is_left_alone() -> None:
    machine = Machine()
    machine.threads = 1
    tuner = ThreadTuner(1, machine.set_threads)
    machine.run(tuner, {1: 0.01}, 1000)
    assert set(machine.history) == {1}


TRIAL_WINDOW = 16  # steps for a drift to be seen (a median of 6) and a trial of 6 to finish
