"""Marshmallow schemas for every REST body and Socket.IO payload: one place that says what input is valid."""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from server.errors import ApiError, validation_error

# C0/C1 control characters except tab, newline and carriage return.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATES = re.compile(r"[\ud800-\udfff]")
# Bidirectional embeddings, overrides and isolates (U+202A-202E, U+2066-2069): in a visitor's text they reorder
# what an agent reads (a reversed order number, a spoofed line); no support message needs them.
_BIDI_CONTROLS = re.compile(r"[\u202a-\u202e\u2066-\u2069]")
_ID_PATTERN = validate.Regexp(r"^[A-Za-z0-9_.:@\-]{1,128}$", error="Use 1-128 letters, digits or _.:@-")


class Text(fields.String):
    """A string that is valid Unicode: a lone surrogate (JSON allows `\\ud800`) can be neither stored nor sent."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not text.isascii() and _SURROGATES.search(text):
            raise ValidationError("Not valid Unicode text (a lone surrogate).")
        return text


class CleanString(Text):
    """A string normalized to NFC with control and bidi-override characters removed, so stored text is what users see."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        text = _CONTROL_CHARS.sub("", unicodedata.normalize("NFC", text))
        return text if text.isascii() else _BIDI_CONTROLS.sub("", text)


class MessageText(CleanString):
    """A chat message: over `max_length` characters (once cleaned) is payload_too_large, not a validation error."""

    def __init__(self, max_length: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_length = max_length

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if len(text) > self.max_length:
            limit = f"At most {self.max_length} characters (got {len(text)})."
            raise ApiError("payload_too_large", f"The message is too long. {limit}", {attr or "message": limit})
        return text


class StrictSchema(Schema):
    """Unknown fields are refused rather than silently dropped."""

    class Meta:
        unknown = RAISE


def _metadata_field(max_bytes: int) -> fields.Dict:
    """Free-form client metadata, capped so it cannot bloat the session record."""

    def small_enough(value: dict[str, Any]) -> None:
        try:
            size = len(json.dumps(value, ensure_ascii=False, allow_nan=False).encode())
        except ValueError:  # a lone surrogate or a non-finite number (the JSON decoder already refuses both)
            raise ValidationError("Not valid JSON data.") from None
        if size > max_bytes:
            raise ValidationError(f"At most {max_bytes} bytes of JSON.")

    return fields.Dict(keys=Text(validate=validate.Length(max=64)), load_default=dict, validate=small_enough)


@dataclass(frozen=True, slots=True)
class Schemas:
    """The schema instances, built once per app with the limits from settings."""

    create_session: Schema
    send_message: Schema
    join_chat: Schema
    escalate: Schema
    session_ref: Schema
    history_query: Schema
    provide_contact: Schema
    agent_session: Schema
    agent_message: Schema
    agent_close: Schema
    ticket_resolve: Schema
    feedback: Schema


def build_schemas(max_message_length: int, metadata_max_bytes: int) -> Schemas:
    """Make schemas that know the configured limits (marshmallow 4 has no context)."""

    message_field = MessageText(
        max_message_length,
        required=True,
        validate=[
            validate.Length(min=1, max=max_message_length, error=f"Between 1 and {max_message_length} characters."),
            validate.Predicate("strip", error="The message is empty."),
        ],
    )

    class CreateSessionSchema(StrictSchema):
        userId = CleanString(required=True, validate=validate.Length(min=1, max=128))
        metadata = _metadata_field(metadata_max_bytes)

    class SendMessageSchema(StrictSchema):
        sessionId = fields.String(required=True, validate=_ID_PATTERN)
        message = message_field
        clientMessageId = fields.String(validate=_ID_PATTERN, allow_none=True)
        token = Text(validate=validate.Length(max=256))

    class JoinChatSchema(StrictSchema):
        sessionId = fields.String(validate=_ID_PATTERN)
        token = Text(validate=validate.Length(min=1, max=256))
        afterMessageId = fields.String(validate=_ID_PATTERN, allow_none=True)
        userId = CleanString(validate=validate.Length(min=1, max=128))
        metadata = _metadata_field(metadata_max_bytes)

        @validates_schema
        def one_way_in(self, data: dict[str, Any], **_: Any) -> None:
            rejoin = "sessionId" in data or "token" in data
            if rejoin:
                missing = {k: "Missing data for required field." for k in ("sessionId", "token") if k not in data}
                if missing:
                    raise ValidationError(missing)
            elif "userId" not in data:
                raise ValidationError({"userId": "Give userId to start a session, or sessionId and token."})

    class EscalateSchema(StrictSchema):
        sessionId = fields.String(required=True, validate=_ID_PATTERN)
        reason = CleanString(validate=validate.Length(max=500), allow_none=True)
        token = Text(validate=validate.Length(max=256))

    class SessionRefSchema(StrictSchema):
        sessionId = fields.String(required=True, validate=_ID_PATTERN)
        token = Text(validate=validate.Length(max=256))

    class HistoryQuerySchema(StrictSchema):
        limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=200))
        before = fields.String(validate=_ID_PATTERN)

    class ProvideContactSchema(StrictSchema):
        sessionId = fields.String(required=True, validate=_ID_PATTERN)
        email = fields.Email(required=True, validate=validate.Length(max=254))
        token = Text(validate=validate.Length(max=256))

    class AgentSessionSchema(StrictSchema):
        sessionId = fields.String(required=True, validate=_ID_PATTERN)

    class AgentMessageSchema(StrictSchema):
        sessionId = fields.String(required=True, validate=_ID_PATTERN)
        message = message_field

    class AgentCloseSchema(StrictSchema):
        sessionId = fields.String(required=True, validate=_ID_PATTERN)
        resolution = CleanString(load_default="Resolved", validate=validate.Length(min=1, max=500))

    class TicketResolveSchema(StrictSchema):
        resolution = CleanString(load_default=None, allow_none=True, validate=validate.Length(max=1000))

    class FeedbackSchema(StrictSchema):
        sessionId = fields.String(required=True, validate=_ID_PATTERN)
        messageId = fields.String(required=True, validate=_ID_PATTERN)
        rating = fields.String(required=True, validate=validate.OneOf(["up", "down"]))
        comment = CleanString(load_default=None, allow_none=True, validate=validate.Length(max=1000))
        token = Text(validate=validate.Length(max=256))

    return Schemas(
        create_session=CreateSessionSchema(),
        send_message=SendMessageSchema(),
        join_chat=JoinChatSchema(),
        escalate=EscalateSchema(),
        session_ref=SessionRefSchema(),
        history_query=HistoryQuerySchema(),
        provide_contact=ProvideContactSchema(),
        agent_session=AgentSessionSchema(),
        agent_message=AgentMessageSchema(),
        agent_close=AgentCloseSchema(),
        ticket_resolve=TicketResolveSchema(),
        feedback=FeedbackSchema(),
    )


def load(schema: Schema, payload: Any) -> dict[str, Any]:
    """Validate a payload or raise the contract's validation_error; non-objects are refused too."""
    if not isinstance(payload, dict):
        raise ApiError("validation_error", "The payload must be a JSON object.")
    try:
        loaded: dict[str, Any] = schema.load(payload)
        return loaded
    except ValidationError as err:
        raise validation_error(err.normalized_messages()) from None
