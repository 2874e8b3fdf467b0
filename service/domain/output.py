"""Output items of one response, built from a backend completion whole or delta by delta, together with
the Responses stream events that announce them.

The non-streaming path feeds the whole message at once and ignores the events; the streaming path feeds
chunks and forwards the events. One builder for both, so a streamed turn stores exactly the items a
non-streamed one would. Item order is the order the assistant message renders: reasoning, text, calls.
"""

from __future__ import annotations

from typing import Any

from service.domain import ids
from service.domain.items import Item

Event = dict[str, Any]

# The events that end a response's stream.
TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def terminal_event_type(status: str) -> str:
    """The event that ends the stream of a response with this final status. OpenAI's events have no
    cancelled one: a cancelled response ends its stream with `response.failed`, status `cancelled`."""
    return "response.failed" if status == "cancelled" else f"response.{status}"


class OutputBuilder:
    def __init__(self) -> None:
        self.items: list[Item] = []
        self._events: list[Event] = []
        self._reasoning: Item | None = None
        self._message: Item | None = None
        self._calls: dict[int, Item] = {}
        self._open: Item | None = None
        self._status = "completed"

    # --- feeding ------------------------------------------------------------------------------------

    def reasoning_delta(self, text: str) -> None:
        if not text:
            return
        if self._reasoning is None:
            self._close_open()
            self._reasoning = self._add(
                {"id": ids.new_id(ids.REASONING), "type": "reasoning", "summary": [], "content": []}
            )
            self._event(
                "response.content_part.added",
                self._reasoning,
                content_index=0,
                part={"type": "reasoning_text", "text": ""},
            )
            self._reasoning["_text"] = ""
        self._reasoning["_text"] += text
        self._event("response.reasoning_text.delta", self._reasoning, content_index=0, delta=text)

    def text_delta(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> None:
        if not text and not logprobs:
            return
        message = self._ensure_message()
        message["_text"] += text
        message["_logprobs"].extend(logprobs or [])
        self._event(
            "response.output_text.delta", message, content_index=0, delta=text, logprobs=logprobs or []
        )

    def tool_call_delta(self, index: int, call_id: str | None, name: str | None, arguments: str) -> None:
        call = self._calls.get(index)
        if call is None:
            self._close_open()
            call = self._add(
                {
                    "id": ids.new_id(ids.FUNCTION_CALL),
                    "type": "function_call",
                    "call_id": call_id or ids.new_id("call"),
                    "name": name or "",
                    "arguments": "",
                    "status": "in_progress",
                }
            )
            self._calls[index] = call
        if arguments:
            call["arguments"] += arguments
            self._event("response.function_call_arguments.delta", call, delta=arguments)

    def whole(
        self,
        content: str | None,
        reasoning: str | None,
        tool_calls: list[dict[str, Any]],
        logprobs: list[dict[str, Any]] | None = None,
    ) -> None:
        """A complete (non-streamed) assistant message."""
        self.reasoning_delta(reasoning or "")
        self.text_delta(content or "", logprobs)
        for index, call in enumerate(tool_calls):
            function = call.get("function") or {}
            self.tool_call_delta(
                index, call.get("id"), function.get("name"), str(function.get("arguments") or "")
            )

    def finish(self, status: str = "completed") -> list[Item]:
        """Close every item; an empty reply is still one (empty) assistant message."""
        if not self._calls and self._message is None:
            self._ensure_message()
        self._status = status
        self._close_open()
        return self.items

    def drain(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    # --- internals ----------------------------------------------------------------------------------

    def _ensure_message(self) -> Item:
        if self._message is None:
            self._close_open()
            self._message = self._add(
                {
                    "id": ids.new_id(ids.MESSAGE),
                    "type": "message",
                    "role": "assistant",
                    "status": "in_progress",
                    "content": [],
                }
            )
            self._message["_text"], self._message["_logprobs"] = "", []
            self._event(
                "response.content_part.added",
                self._message,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
            )
        return self._message

    def _add(self, item: Item) -> Item:
        self.items.append(item)
        self._open = item
        self._events.append(
            {"type": "response.output_item.added", "output_index": len(self.items) - 1, "item": _public(item)}
        )
        return item

    def _event(self, kind: str, item: Item, **fields: Any) -> None:
        self._events.append(
            {"type": kind, "item_id": item["id"], "output_index": self.items.index(item), **fields}
        )

    def _close_open(self) -> None:
        item, self._open = self._open, None
        if item is None:
            return
        status = self._status
        if item["type"] == "reasoning":
            text = item.pop("_text")
            item["content"] = [{"type": "reasoning_text", "text": text}]
            self._event("response.reasoning_text.done", item, content_index=0, text=text)
            self._event("response.content_part.done", item, content_index=0, part=item["content"][0])
        elif item["type"] == "message":
            text, logprobs = item.pop("_text"), item.pop("_logprobs")
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}
            item["content"], item["status"] = [part], status
            self._event("response.output_text.done", item, content_index=0, text=text, logprobs=logprobs)
            self._event("response.content_part.done", item, content_index=0, part=part)
        else:
            item["status"] = status
            self._event("response.function_call_arguments.done", item, arguments=item["arguments"])
        self._events.append(
            {
                "type": "response.output_item.done",
                "output_index": self.items.index(item),
                "item": _public(item),
            }
        )


def _public(item: Item) -> Item:
    return {key: value for key, value in item.items() if not key.startswith("_")}


def output_items(
    content: str | None, reasoning: str | None, tool_calls: list[dict[str, Any]], *, status: str = "completed"
) -> list[Item]:
    builder = OutputBuilder()
    builder.whole(content, reasoning, tool_calls)
    return builder.finish(status)
