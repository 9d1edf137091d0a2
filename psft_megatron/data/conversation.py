"""Record -> conversation: both schemas become a list of ``{"role", "content"}`` messages.

- ``prompt_response``: ``prompt_key`` and ``response_key`` (dotted paths, e.g.
  ``extra_info.question``). The prompt is a string (-> one user message) or a list of chat
  messages (system/user/assistant; an assistant message there is context, not trained). The
  response is a non-empty string and becomes the single TRAINED assistant turn.
- ``messages``: an OpenAI-style list; every assistant turn is trained, the rest is context.

The result is a :class:`Conversation`: ``messages`` plus ``trained`` (one bool per message).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping

from psft_megatron.data.errors import DataError, Location

ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    """messages: [{"role": str, "content": str}], trained: [bool] (True only for assistant)."""

    messages: List[dict]
    trained: List[bool]


def get_path(record: Mapping, dotted: str, loc: Location) -> Any:
    """``record["a"]["b"]`` for ``"a.b"``; a missing key names the key and the keys present."""
    node: Any = record
    walked = []
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            where = ".".join(walked) or "<record>"
            raise DataError(
                f"key {dotted!r}: {where!r} is a {type(node).__name__}, not an object", loc
            )
        if part not in node:
            where = f" under {'.'.join(walked)!r}" if walked else ""
            raise DataError(
                f"missing key {dotted!r} (no {part!r}{where}); keys present: {sorted(node)}", loc
            )
        node = node[part]
        walked.append(part)
    return node


def has_path(record: Mapping, dotted: str) -> bool:
    node: Any = record
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _check_messages(messages: Any, key: str, loc: Location) -> List[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{key!r} must be a non-empty list of messages, got {type(messages).__name__}", loc)
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise DataError(f"{key}[{i}] must be an object with 'role' and 'content', got {type(msg).__name__}", loc)
        for field in ("role", "content"):
            if field not in msg:
                raise DataError(f"{key}[{i}] is missing key {field!r}; keys present: {sorted(msg)}", loc)
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise DataError(f"{key}[{i}].role must be one of {ROLES}, got {role!r}", loc)
        if not isinstance(content, str):
            raise DataError(f"{key}[{i}].content must be a string, got {type(content).__name__}", loc)
        out.append({"role": role, "content": content})
    return out


def to_conversation(record: Mapping, loc: Location, schema: str, prompt_key: str, response_key: str,
                    messages_key: str) -> Conversation:
    """Normalise one record; raises :class:`DataError` naming file, line/row, key and problem."""
    if schema == "auto":
        schema = "messages" if has_path(record, messages_key) else "prompt_response"
    if schema == "messages":
        messages = _check_messages(get_path(record, messages_key, loc), messages_key, loc)
        trained = [m["role"] == "assistant" for m in messages]
        if not any(trained):
            raise DataError(f"{messages_key!r} has no assistant message: nothing to train on", loc)
        for m, t in zip(messages, trained):
            if t and not m["content"].strip():
                raise DataError(f"empty response: an assistant message in {messages_key!r} is empty", loc)
        return Conversation(messages, trained)
    prompt = get_path(record, prompt_key, loc)
    response = get_path(record, response_key, loc)
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        messages = _check_messages(prompt, prompt_key, loc)
    else:
        raise DataError(
            f"{prompt_key!r} must be a string or a list of chat messages, got {type(prompt).__name__}", loc
        )
    if not isinstance(response, str):
        raise DataError(f"{response_key!r} must be a string, got {type(response).__name__}", loc)
    if not response.strip():
        raise DataError(f"empty response: {response_key!r} is empty", loc)
    messages = messages + [{"role": "assistant", "content": response}]
    return Conversation(messages, [False] * (len(messages) - 1) + [True])
