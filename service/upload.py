"""Read the multipart `image` field while the body streams in, refusing it as soon as it passes the cap.

Starlette's form parser spools whole uploads before a route sees them; this reads request.stream()
through python-multipart's push parser and stops at the first byte over the limit.
"""

from __future__ import annotations

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from .errors import UploadError


async def read_image_field(request: Request, max_bytes: int, field: str = "image") -> bytes:
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError(422, "missing_field", f"send the image as multipart/form-data in a field named '{field}'")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise UploadError(413, "too_large", f"the request body is {declared} bytes; the limit is {max_bytes} bytes")

    parts: dict[str, bytearray] = {}
    state = {"header": b"", "value": b"", "name": None, "headers": {}}

    def on_header_field(data, start, end):
        state["header"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        state["headers"][state["header"].lower()] = state["value"]
        state["header"], state["value"] = b"", b""

    def on_headers_finished():
        _, disp = parse_options_header(state["headers"].get(b"content-disposition", b""))
        state["name"] = disp.get(b"name", b"").decode("utf-8", "replace")
        state["headers"] = {}
        if state["name"] == field:
            parts.setdefault(field, bytearray())

    def on_part_data(data, start, end):
        if state["name"] == field:
            parts[field] += data[start:end]

    parser = MultipartParser(params[b"boundary"], {
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data})
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise UploadError(413, "too_large", f"the request body passed the limit of {max_bytes} bytes")
        try:
            parser.write(chunk)
        except MultipartParseError as e:
            raise UploadError(422, "malformed_multipart", f"the multipart body could not be parsed ({e})") from None
    if field not in parts:
        raise UploadError(422, "missing_field", f"no '{field}' field in the form; send the image as '{field}'")
    return bytes(parts[field])
