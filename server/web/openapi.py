"""The OpenAPI 3.1 description of the REST API, generated from the marshmallow schemas (apispec)."""

from __future__ import annotations

from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import INCLUDE, Schema, fields, validate

from server import __version__
from server.contract import Trigger
from server.schemas import Schemas


class ResponseSchema(Schema):
    """Answers may grow new fields; clients must ignore what they don't know."""

    class Meta:
        unknown = INCLUDE


class ErrorBodySchema(ResponseSchema):
    code = fields.String(required=True)
    message = fields.String(required=True)
    details = fields.Dict()


class ErrorSchema(ResponseSchema):
    error = fields.Nested(ErrorBodySchema, required=True)


class SourceSchema(ResponseSchema):
    id = fields.String(required=True, metadata={"description": "The knowledge-base entry's id."})
    title = fields.String(required=True, metadata={"description": "The entry's title (its question)."})


class MessageSchema(ResponseSchema):
    id = fields.String(required=True)
    sessionId = fields.String(required=True)
    role = fields.String(required=True)
    content = fields.String(required=True)
    createdAt = fields.String(required=True)
    clientMessageId = fields.String()
    provider = fields.String(allow_none=True)
    confidence = fields.Float(allow_none=True)
    sources = fields.List(
        fields.Nested(SourceSchema),
        metadata={
            "description": "Assistant messages only: the knowledge-base entries the answer used, [] when none. "
            "A citation `[n]` in `content` refers to `sources[n - 1]`."
        },
    )


class EscalationSchema(ResponseSchema):
    sessionId = fields.String(required=True)
    trigger = fields.String(required=True, validate=validate.OneOf([trigger.value for trigger in Trigger]))
    reason = fields.String(required=True)
    createdAt = fields.String(required=True)


class SessionCreatedSchema(ResponseSchema):
    sessionId = fields.String(required=True)
    userId = fields.String(required=True)
    token = fields.String(required=True)
    createdAt = fields.String(required=True)
    expiresAt = fields.String(required=True)


class MessageResultSchema(ResponseSchema):
    sessionId = fields.String(required=True)
    userMessage = fields.Nested(MessageSchema, required=True)
    reply = fields.Nested(MessageSchema, allow_none=True, required=True)
    escalation = fields.Nested(EscalationSchema, allow_none=True, required=True)


class HistorySchema(ResponseSchema):
    sessionId = fields.String(required=True)
    messages = fields.List(fields.Nested(MessageSchema), required=True)
    hasMore = fields.Boolean(required=True)


class HealthSchema(ResponseSchema):
    status = fields.String(required=True)
    version = fields.String(required=True)
    uptimeSeconds = fields.Float(required=True)
    redis = fields.Dict(required=True)
    providers = fields.List(fields.Dict(), required=True)
    activeSessions = fields.Integer(required=True)
    connectedClients = fields.Integer(required=True)
    instanceId = fields.String()
    pubsub = fields.String(allow_none=True)
    writeBehind = fields.Dict()
    tokens = fields.Dict()


class FeedbackResultSchema(ResponseSchema):
    sessionId = fields.String(required=True)
    messageId = fields.String(required=True)
    rating = fields.String(required=True)


class DeletedSchema(ResponseSchema):
    sessionId = fields.String(required=True)
    deleted = fields.Boolean(required=True)


class TicketListSchema(ResponseSchema):
    tickets = fields.List(fields.Dict(), required=True)
    nextCursor = fields.String(allow_none=True, metadata={"description": "Pass as `cursor` for the next page; null at the end."})


class AnalyticsSchema(ResponseSchema):
    days = fields.List(fields.Dict(), required=True)


def _json(schema: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    words = {
        400: "Invalid input",
        401: "Missing or wrong credentials",
        404: "Not found",
        413: "Body too large",
        429: "Rate limited",
        503: "Storage unavailable",
    }
    return {str(s): {"description": words[s], **_json("Error")} for s in statuses}


def build_openapi(schemas: Schemas) -> dict[str, Any]:
    """The whole document; request bodies come from the same schema objects the handlers validate with."""
    spec = APISpec(
        title="Support chat REST API",
        version=__version__,
        openapi_version="3.1.0",
        plugins=[MarshmallowPlugin()],
        info={"description": "Real-time AI customer-support chat. Socket.IO events are described in docs/protocol.md."},
    )
    spec.components.security_scheme("sessionToken", {"type": "http", "scheme": "bearer"})
    spec.components.security_scheme("agentKey", {"type": "http", "scheme": "bearer"})
    for name, schema in {
        "Error": ErrorSchema,
        "Source": SourceSchema,
        "Message": MessageSchema,
        "Escalation": EscalationSchema,
        "SessionCreated": SessionCreatedSchema,
        "MessageResult": MessageResultSchema,
        "History": HistorySchema,
        "Health": HealthSchema,
        "FeedbackResult": FeedbackResultSchema,
        "Deleted": DeletedSchema,
        "TicketList": TicketListSchema,
        "Analytics": AnalyticsSchema,
        "CreateSession": schemas.create_session,
        "SendMessage": schemas.send_message,
        "Feedback": schemas.feedback,
        "TicketResolve": schemas.ticket_resolve,
    }.items():
        spec.components.schema(name, schema=schema)

    session_id = {"name": "sessionId", "in": "path", "required": True, "schema": {"type": "string"}}
    ticket_id = {"name": "ticketId", "in": "path", "required": True, "schema": {"type": "string"}}
    token: list[dict[str, list[str]]] = [{"sessionToken": []}]
    agent: list[dict[str, list[str]]] = [{"agentKey": []}]
    body = lambda name: {"required": True, **_json(name)}  # noqa: E731

    spec.path(
        "/api/v1/chat/session",
        operations={
            "post": {
                "summary": "Start a session",
                "requestBody": body("CreateSession"),
                "responses": {"201": {"description": "Created", **_json("SessionCreated")}, **_errors(400, 413, 429, 503)},
            }
        },
    )
    spec.path(
        "/api/v1/chat/message",
        operations={
            "post": {
                "summary": "Send a message and wait for the whole reply",
                "security": token,
                "requestBody": body("SendMessage"),
                "responses": {
                    "200": {"description": "Stored and answered", **_json("MessageResult")},
                    **_errors(400, 401, 404, 413, 429, 503),
                },
            }
        },
    )
    spec.path(
        "/api/v1/chat/message/stream",
        operations={
            "post": {
                "summary": "Send a message; the reply streams as Server-Sent Events (accepted, chunk, interrupted, done, error)",
                "security": token,
                "requestBody": body("SendMessage"),
                "responses": {
                    "200": {"description": "An event stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                    **_errors(400, 401, 404, 413, 429, 503),
                },
            }
        },
    )
    spec.path(
        "/api/v1/chat/history/{sessionId}",
        operations={
            "get": {
                "summary": "A page of history, oldest first",
                "security": token,
                "parameters": [
                    session_id,
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
                    {"name": "before", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {"200": {"description": "Messages", **_json("History")}, **_errors(400, 401, 503)},
            }
        },
    )
    spec.path(
        "/api/v1/chat/session/{sessionId}",
        operations={
            "delete": {
                "summary": "Delete a session and everything kept about it",
                "security": token,
                "parameters": [session_id],
                "responses": {"200": {"description": "Deleted", **_json("Deleted")}, **_errors(401, 503)},
            }
        },
    )
    spec.path(
        "/api/v1/chat/session/{sessionId}/export",
        operations={
            "get": {
                "summary": "Everything kept about a session",
                "security": token,
                "parameters": [session_id],
                "responses": {
                    "200": {"description": "The export", "content": {"application/json": {"schema": {"type": "object"}}}},
                    **_errors(401, 503),
                },
            }
        },
    )
    spec.path(
        "/api/v1/chat/feedback",
        operations={
            "post": {
                "summary": "Rate a reply",
                "security": token,
                "requestBody": body("Feedback"),
                "responses": {"200": {"description": "Recorded", **_json("FeedbackResult")}, **_errors(400, 401, 404, 413, 503)},
            }
        },
    )
    spec.path(
        "/api/v1/tickets",
        operations={
            "get": {
                "summary": "Tickets, newest first (filtered, then paged)",
                "security": agent,
                "parameters": [
                    {"name": "status", "in": "query", "schema": {"type": "string", "enum": ["open", "resolved"]}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {"200": {"description": "Tickets", **_json("TicketList")}, **_errors(400, 401, 429, 503)},
            }
        },
    )
    spec.path(
        "/api/v1/tickets/{ticketId}",
        operations={
            "get": {
                "summary": "One ticket with its transcript",
                "security": agent,
                "parameters": [ticket_id],
                "responses": {
                    "200": {"description": "The ticket", "content": {"application/json": {"schema": {"type": "object"}}}},
                    **_errors(401, 404, 429, 503),
                },
            }
        },
    )
    spec.path(
        "/api/v1/tickets/{ticketId}/resolve",
        operations={
            "post": {
                "summary": "Close a ticket",
                "security": agent,
                "parameters": [ticket_id],
                "requestBody": {"required": False, **_json("TicketResolve")},
                "responses": {
                    "200": {
                        "description": "The resolved ticket",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_errors(400, 401, 404, 413, 429, 503),
                },
            }
        },
    )
    spec.path(
        "/api/v1/analytics",
        operations={
            "get": {
                "summary": "Per-day figures for the last 30 days",
                "security": agent,
                "responses": {"200": {"description": "Analytics", **_json("Analytics")}, **_errors(401, 429, 503)},
            }
        },
    )
    for path in ("/api/v1/health", "/health"):
        spec.path(
            path,
            operations={
                "get": {
                    "summary": "Health",
                    "responses": {
                        "200": {"description": "ok or degraded", **_json("Health")},
                        "503": {"description": "down", **_json("Health")},
                    },
                }
            },
        )
    return spec.to_dict()
