"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with a status."""

from __future__ import annotations

from typing import Any

# The ``type`` OpenAI gives each status.
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
          404: "invalid_request_error", 405: "invalid_request_error",
          429: "rate_limit_exceeded", 503: "server_error"}


class APIError(Exception):
    """An error answered to the client as it is; anything else is a 500."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, _TYPES.get(self.status, "server_error"), self.param,
                          self.code)


def bad_request(message: str, param: str | None = None,
                code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


def error_body(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
