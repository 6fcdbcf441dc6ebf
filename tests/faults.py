"""Fault injection for the reliability tests."""


def failing_on(n: int, real, exc: BaseException):
    """``real``, except that its ``n``-th call (counted over all threads) raises ``exc``."""
    calls = []

    def wrapper(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise exc
        return real(*a, **k)

    return wrapper


def stopping_at(at: int, how: str):
    """A progress callback that stops a load at its ``at``-th call, by returning False
    (``how="cancel"``) or raising KeyboardInterrupt (``"interrupt"``), and the exception the load
    then raises."""
    from gguf_gpu_lab import LoadCancelled

    seen = []

    def progress(done, total, name):
        seen.append(done)
        if len(seen) == at:
            if how == "interrupt":
                raise KeyboardInterrupt
            return False

    return progress, KeyboardInterrupt if how == "interrupt" else LoadCancelled
