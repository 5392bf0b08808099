"""Every error the service answers is JSON `{detail, code}`: bad uploads, unknown routes, validation, overload."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

log = logging.getLogger("service")


class UploadError(ValueError):
    """A request that cannot be segmented (not multipart, too large, not an image, corrupt; or not now: overloaded,
    timed out); `status`, `code` and `headers` say how the HTTP layer reports it."""

    def __init__(self, status: int, code: str, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


def error_response(status: int, code: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "code": code}, status_code=status, headers=headers)


HTTP_CODES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 503: "not_ready"}


async def on_upload_error(request: Request, e: UploadError) -> JSONResponse:
    return error_response(e.status, e.code, e.detail, e.headers)


async def on_validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {}
    where = ".".join(str(x) for x in first.get("loc", ()))
    return error_response(422, "invalid_request", f"{where}: {first.get('msg', 'invalid request')}")


async def on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return error_response(e.status_code, HTTP_CODES.get(e.status_code, "http_error"), str(e.detail), e.headers)


async def on_client_disconnect(request: Request, e: ClientDisconnect) -> JSONResponse:
    """The client went away mid-upload: nobody will read an answer; one line at INFO, not a traceback."""
    log.info("client disconnected during %s %s", request.method, request.url.path)
    return error_response(499, "client_disconnected", "the client closed the connection before the body arrived")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(UploadError, on_upload_error)
    app.add_exception_handler(ClientDisconnect, on_client_disconnect)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
