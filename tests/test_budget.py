"""TrainClock: the training tokens and seconds every evaluation record carries, and the train.max_seconds stop."""
from pipeline.engine.budget import TrainClock


def test_clock_counts_and_stops_once_the_seconds_are_spent_and_resumes_its_totals():
    clock = TrainClock(max_seconds=1.0)
    assert not clock.tick(256, 0.4) and not clock.tick(256, 0.4)
    assert clock.tick(256, 0.4)  # 1.2 s >= 1 s: stop after this step
    assert clock.totals() == {"train_tokens": 768, "train_seconds": clock.seconds} and abs(clock.seconds - 1.2) < 1e-9
    resumed = TrainClock(max_seconds=1.0)
    resumed.load_state_dict(clock.state_dict())
    assert resumed.totals() == clock.totals() and resumed.tick(256, 0.01)


def test_no_limit_never_stops():
    clock = TrainClock()
    assert not any(clock.tick(1, 1e6) for _ in range(3)) and clock.tokens == 3
