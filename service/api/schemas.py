"""Request bodies of the public API (validation only; the pipeline never sees HTTP)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

METADATA_MAX_PAIRS = 16
METADATA_MAX_KEY = 64
METADATA_MAX_VALUE = 512
# The upper bound of every count a client sends (max_output_tokens, max_tool_calls): far above any
# context window, and within the 32-bit integers backends keep them in.
MAX_COUNT = 2**31 - 1
MIN_OUTPUT_TOKENS = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionTool(_Strict):
    type: Literal["function"]
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedToolChoice(_Strict):
    type: Literal["function"]
    name: str


class Reasoning(_Strict):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


def validate_metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is None:
        return None
    if len(value) > METADATA_MAX_PAIRS:
        raise ValueError(f"metadata may have at most {METADATA_MAX_PAIRS} pairs")
    for key, item in value.items():
        if len(key) > METADATA_MAX_KEY:
            raise ValueError(f"metadata keys may be at most {METADATA_MAX_KEY} characters")
        if len(item) > METADATA_MAX_VALUE:
            raise ValueError(f"metadata values may be at most {METADATA_MAX_VALUE} characters")
    return value


# What a conversation id looks like: anything else is a malformed value (400), not a missing one (404).
CONVERSATION_ID_PATTERN = r"^conv_[A-Za-z0-9]+$"
ConversationId = Annotated[str, Field(pattern=CONVERSATION_ID_PATTERN)]


class ConversationRef(_Strict):
    id: ConversationId


# Request fields of OpenAI's API that need what this service does not have (stored prompt templates,
# moderation, server-side compaction settings, image generation, OpenAI's access programs, cache and
# background tuning of OpenAI's fleet): refused by name rather than silently ignored.
UNSUPPORTED_FIELDS = (
    "prompt",
    "prompt_cache_options",
    "context_management",
    "moderation",
    "background_options",
    "access_programs",
    "image",
)


class CreateResponseBody(_Strict):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: str | list[Any]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    # OpenAI's minimum: fewer tokens cannot hold a reasoning model's first output.
    max_output_tokens: Annotated[int, Field(ge=MIN_OUTPUT_TOKENS, le=MAX_COUNT)] | None = None
    user: str | None = None
    safety_identifier: Annotated[str, Field(max_length=64)] | None = None
    prompt_cache_key: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None
    reasoning: Reasoning | None = None
    text: TextConfig | None = None
    truncation: Literal["auto", "disabled"] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    include: list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    background: bool = False
    conversation: ConversationId | ConversationRef | None = None
    # Accepted and echoed: this service keeps its prefix handles as long as the backend does.
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    # This service's extension: start with a named prefix (POST /v1/prefixes; domain/prefixes.py).
    convstate_prefix: Annotated[str, Field(max_length=64)] | None = None
    # Fields of OpenAI's API this service refuses with 400 `unsupported_parameter` (UNSUPPORTED_FIELDS).
    prompt: Any = None
    prompt_cache_options: Any = None
    context_management: Any = None
    moderation: Any = None
    background_options: Any = None
    access_programs: Any = None
    image: Any = None

    _metadata = field_validator("metadata")(validate_metadata)

    @field_validator("include")
    @classmethod
    def _known_include(cls, value: list[str] | None) -> list[str] | None:
        supported = {"message.output_text.logprobs", "reasoning.encrypted_content"}
        for entry in value or []:
            if entry not in supported:
                raise ValueError(
                    f"unsupported include value {entry!r}; supported: {', '.join(sorted(supported))}"
                )
        return value


class CompactBody(_Strict):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: str | list[Any] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    prompt_cache_key: str | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None


class ListQuery(_Strict):
    after: str | None = None
    limit: Annotated[int, Field(ge=1, le=100)] = 20
    order: Literal["asc", "desc"] = "desc"


# --- Conversations API --------------------------------------------------------------------------------

CONVERSATION_MAX_ITEMS = 20

INCLUDABLE = frozenset(
    {
        "file_search_call.results",
        "web_search_call.results",
        "web_search_call.action.sources",
        "message.input_image.image_url",
        "computer_call_output.output.image_url",
        "code_interpreter_call.outputs",
        "reasoning.encrypted_content",
        "message.output_text.logprobs",
    }
)


def validate_includable(value: list[str] | None) -> list[str] | None:
    for entry in value or []:
        if entry not in INCLUDABLE:
            raise ValueError(
                f"unsupported include value {entry!r}; supported: {', '.join(sorted(INCLUDABLE))}"
            )
    return value


class CreateConversationBody(_Strict):
    items: Annotated[list[Any], Field(max_length=CONVERSATION_MAX_ITEMS)] | None = None
    metadata: dict[str, str] | None = None

    _metadata = field_validator("metadata")(validate_metadata)


class UpdateConversationBody(_Strict):
    # Required, as in OpenAI's API; null clears the metadata.
    metadata: dict[str, str] | None

    _metadata = field_validator("metadata")(validate_metadata)


class AddConversationItemsBody(_Strict):
    items: Annotated[list[Any], Field(min_length=1, max_length=CONVERSATION_MAX_ITEMS)]


class IncludeQuery(_Strict):
    """`include` as plain repeated keys or as `include[]` (the openai SDK's array format)."""

    include: list[str] | None = None
    include_brackets: Annotated[list[str] | None, Field(alias="include[]")] = None

    _include = field_validator("include", "include_brackets")(validate_includable)


class ConversationItemsQuery(ListQuery, IncludeQuery):
    pass
