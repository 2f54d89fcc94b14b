"""A fake LLM provider over real HTTP (OpenAI and Anthropic APIs) with faults: a development and test tool.

Never deployed, and never imported by ``libs`` or ``services``: the tests, the benchmarks and ``tollgate
up``/``demo`` without a provider URL (``ops.launcher`` runs it as a process) use it; it is the only fake
in the test suite.

In-process: ``async with FakeProvider() as fp`` (or ``with FakeProvider().in_thread() as fp``);
as a process: ``python -m tools.fake_provider --port N``. Control: ``POST /_control``,
``GET /_control/state``; see :mod:`tools.fake_provider.app`.
"""

from tools.fake_provider.app import (
    ANSWER_PREFIX,
    FILLER_WORD,
    MODES,
    FaultConfig,
    ProviderState,
    count_words,
    create_app,
)
from tools.fake_provider.server import FakeProvider

__all__ = ["ANSWER_PREFIX", "FILLER_WORD", "MODES", "FakeProvider", "FaultConfig", "ProviderState", "count_words",
           "create_app"]
