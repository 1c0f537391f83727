"""The OpenAPI 3 description of ``/api``, served at ``/api/openapi.json``.

Written by hand next to the handlers it describes; tests check it against the live routes
and send generated requests at the running app.
"""

from __future__ import annotations

from typing import Any

from notify import names

from .schema import MAX_BATCH, MAX_KEY_LENGTH, MAX_REASON_LENGTH, WATCH_TOKEN_TTL

_USER_ID = {"type": "string", "pattern": names.ID.pattern}
_EVENT = {"type": "string", "pattern": names.EVENT_NAME.pattern}
_STORES = {
    "type": "array",
    "items": {"type": "string", "pattern": names.STORE_NAME.pattern},
}
_NOTIFICATION = {
    "type": "object",
    "additionalProperties": False,
    "required": ["user_id", "event"],
    "properties": {
        "user_id": _USER_ID,
        "event": _EVENT,
        "data": {"type": "object", "description": "at most 64 KiB as JSON"},
        "invalidate": _STORES,
        "idempotency_key": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH},
    },
}
_ERROR = {
    "description": "error",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["code", "message", "field"],
                        "properties": {
                            "code": {"type": "string"},
                            "message": {"type": "string"},
                            "field": {"type": ["string", "null"]},
                        },
                    }
                },
            }
        }
    },
}
_ERRORS = dict.fromkeys(("400", "401", "413", "415", "422", "429", "503"), _ERROR)


def _json(schema: dict[str, Any], description: str = "ok") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _limit(maximum: int) -> dict[str, Any]:
    return {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": maximum, "default": 50},
    }


_USER_PARAM = {"name": "user_id", "in": "path", "required": True, "schema": _USER_ID}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "notify-gateway API", "version": "1"},
    "components": {"securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}}},
    "security": [{"apiKey": []}],
    "paths": {
        "/api/publish": {
            "post": {
                "summary": "Publish one notification, or a batch (all or nothing)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "oneOf": [
                                    _NOTIFICATION,
                                    {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "required": ["notifications"],
                                        "properties": {
                                            "notifications": {
                                                "type": "array",
                                                "minItems": 1,
                                                "maxItems": MAX_BATCH,
                                                "items": _NOTIFICATION,
                                            }
                                        },
                                    },
                                ]
                            }
                        }
                    },
                },
                "responses": {
                    "202": _json(
                        {
                            "type": "object",
                            "required": ["ids"],
                            "properties": {"ids": {"type": "array", "items": {"type": "string"}}},
                        },
                        "published; a repeated idempotency_key returns the first id",
                    ),
                    **_ERRORS,
                },
            }
        },
        "/api/trigger-update": {
            "post": {
                "summary": "Delete a student's server cache keys and push an event (audited)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["student_id"],
                                "properties": {
                                    "student_id": _USER_ID,
                                    "course_id": _USER_ID,
                                    "reason": {
                                        "type": "string",
                                        "minLength": 1,
                                        "maxLength": MAX_REASON_LENGTH,
                                    },
                                    "event": {**_EVENT, "default": "STORE_INVALIDATE"},
                                    "invalidate": {**_STORES, "default": ["home", "learning"]},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["id", "cache_keys_deleted", "connections"],
                            "properties": {
                                "id": {"type": "string"},
                                "cache_keys_deleted": {
                                    "type": "array",
                                    "items": {"type": "string"},
                                },
                                "connections": {
                                    "type": ["integer", "null"],
                                    "description": "null if presence could not be read",
                                },
                            },
                        }
                    ),
                    **_ERRORS,
                },
            }
        },
        "/api/history/{user_id}": {
            "get": {
                "summary": "A student's recent notifications, oldest first",
                "parameters": [_USER_PARAM, _limit(1000)],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["user_id", "events"],
                            "properties": {
                                "user_id": {"type": "string"},
                                "events": {"type": "array", "items": {"type": "object"}},
                            },
                        }
                    ),
                    **_ERRORS,
                },
            }
        },
        "/api/presence/{user_id}": {
            "get": {
                "summary": "How many connections a student has, over every gateway process",
                "parameters": [_USER_PARAM],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["user_id", "connections"],
                            "properties": {
                                "user_id": {"type": "string"},
                                "connections": {"type": "integer"},
                            },
                        }
                    ),
                    **_ERRORS,
                },
            }
        },
        "/api/students/{user_id}/watch-token": {
            "post": {
                "summary": "A short-lived token to watch a student's live events (audited)",
                "description": (
                    "Signed with NOTIFY_JWT_SECRET; a gateway configured with "
                    "NOTIFY_JWT_PUBLIC_KEY cannot sign and answers 409 cannot_sign."
                ),
                "parameters": [_USER_PARAM],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["user_id", "token", "expires_in"],
                            "properties": {
                                "user_id": {"type": "string"},
                                "token": {"type": "string"},
                                "expires_in": {"type": "integer", "const": WATCH_TOKEN_TTL},
                            },
                        }
                    ),
                    "409": _ERROR,
                    **_ERRORS,
                },
            }
        },
        "/api/audit": {
            "get": {
                "summary": "Operator actions (trigger-update, watch-token), newest first",
                "parameters": [_limit(1000)],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["entries"],
                            "properties": {
                                "entries": {"type": "array", "items": {"type": "object"}}
                            },
                        }
                    ),
                    **_ERRORS,
                },
            }
        },
    },
}
