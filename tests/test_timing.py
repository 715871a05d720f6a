from kl_bench.timing import median_seconds


class CountingBackend:
    def __init__(self):
        self.synced = []

    def sync(self, x=None):
        self.synced.append(x)


def test_median_seconds_warms_up_and_synchronises_every_call():
    be, calls = CountingBackend(), []
    seconds = median_seconds(lambda: calls.append(1) or len(calls), be, repeats=4)
    assert len(calls) == 5 and be.synced == [1, 2, 3, 4, 5]  # one untimed warm-up, then 4 timed
    assert seconds >= 0
