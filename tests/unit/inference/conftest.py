from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.inference.anthropic_http import AnthropicHttpEngine
from services.inference.engine import ServedModel
from services.inference.openai_http import OpenAIHttpEngine
from tests.unit.inference.support import API_KEY
from tools.fake_provider import FakeProvider


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider(api_key=API_KEY) as fp:
        yield fp


@pytest.fixture
async def openai_engine(fake: FakeProvider) -> AsyncIterator[OpenAIHttpEngine]:
    engine = OpenAIHttpEngine(base_url=fake.url, api_key=API_KEY, provider="fakeai",
                              models=[ServedModel("tiny", "fakeai", 1000, upstream="fake-small")])
    yield engine
    await engine.aclose()


@pytest.fixture
async def anthropic_engine(fake: FakeProvider) -> AsyncIterator[AnthropicHttpEngine]:
    engine = AnthropicHttpEngine(base_url=fake.url, api_key=API_KEY, default_max_output_tokens=50,
                                 models=[ServedModel("claude-tiny", "anthropic", 1000, upstream="fake-claude")])
    yield engine
    await engine.aclose()

