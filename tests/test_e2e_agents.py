"""The OpenAI Agents SDK runs an agent with a function tool to a final answer through convstate, chaining
turns by previous_response_id (convstate keeps the state) and by a Conversations-API conversation."""

from __future__ import annotations

import pytest

agents = pytest.importorskip("agents")

from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled  # noqa: E402
from openai import AsyncOpenAI  # noqa: E402

from tests.conftest import Service  # noqa: E402

set_tracing_disabled(True)


@function_tool
def lookup(word: str) -> str:
    """Look a word up in the glossary."""
    return f"{word}: a semi-aquatic mammal"


def _agent(service: Service) -> Agent:
    client = AsyncOpenAI(base_url=f"{service.url}/v1", api_key=service.api_key, max_retries=0)
    return Agent(
        name="glossary",
        instructions="Use the lookup tool when asked.",
        tools=[lookup],
        model=OpenAIResponsesModel(model="ref-chatml", openai_client=client),
    )


@pytest.fixture
def cache_service(service_factory: object) -> Service:
    service: Service = service_factory("postgres", backend_mode="cache_ref")  # type: ignore[operator]
    return service


async def test_agent_with_a_tool_chains_by_previous_response_id(cache_service: Service) -> None:
    result = await Runner.run(_agent(cache_service), "please lookup otter", auto_previous_response_id=True)
    assert "a semi-aquatic mammal" in result.final_output
    assert result.last_response_id is not None
    follow = await Runner.run(_agent(cache_service), "thanks", previous_response_id=result.last_response_id)
    assert follow.final_output


async def test_agent_in_a_conversation(cache_service: Service) -> None:
    client = AsyncOpenAI(base_url=f"{cache_service.url}/v1", api_key=cache_service.api_key, max_retries=0)
    conversation = await client.conversations.create()
    result = await Runner.run(_agent(cache_service), "please lookup otter", conversation_id=conversation.id)
    assert "a semi-aquatic mammal" in result.final_output
    items = [item async for item in client.conversations.items.list(conversation.id, order="asc")]
    assert [item.type for item in items][:2] == ["message", "function_call"]
