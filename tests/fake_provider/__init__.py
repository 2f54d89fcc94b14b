"""The only fake in the test suite: an LLM provider over real HTTP (OpenAI and Anthropic APIs) with faults.

In-process: ``async with FakeProvider() as fp`` (or ``with FakeProvider().in_thread() as fp``);
as a process: ``python -m tests.fake_provider --port N``. Control: ``POST /_control``,
``GET /_control/state``; see :mod:`tests.fake_provider.app`.
"""

from tests.fake_provider.app import (
    ANSWER_PREFIX,
    FILLER_WORD,
    MODES,
    FaultConfig,
    ProviderState,
    count_words,
    create_app,
)
from tests.fake_provider.server import FakeProvider

__all__ = ["ANSWER_PREFIX", "FILLER_WORD", "MODES", "FakeProvider", "FaultConfig", "ProviderState", "count_words",
           "create_app"]
