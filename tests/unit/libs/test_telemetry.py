import logging

from libs.telemetry import ConnectionTracebackFilter


def _record(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        import sys

        return logging.LogRecord("asyncpg.pool", logging.WARNING, __file__, 1,
                                 "Failed to restore the pool connection floor; %s", ("retrying",), sys.exc_info())


def test_a_connection_error_is_one_line_naming_the_error() -> None:
    record = _record(ConnectionRefusedError(111, "Connect call failed"))
    assert ConnectionTracebackFilter().filter(record)
    assert record.exc_info is None
    assert record.getMessage() == ("Failed to restore the pool connection floor; retrying "
                                   "(ConnectionRefusedError: [Errno 111] Connect call failed)")


def test_any_other_error_keeps_its_traceback() -> None:
    record = _record(ValueError("a bug"))
    assert ConnectionTracebackFilter().filter(record)
    assert record.exc_info is not None and record.getMessage().endswith("retrying")
