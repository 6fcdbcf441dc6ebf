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
