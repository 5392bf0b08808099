"""Read the multipart `image` field (or a JSON body's base64 `image`) while the body streams in, refusing it as soon
as it passes the cap.

Starlette's form parser spools whole uploads before a route sees them; this reads request.stream()
through python-multipart's push parser and stops at the first byte over the limit, at a second `image`
part, or when the whole body has not arrived within the body timeout.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Callable

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from .errors import UploadError


class FileParts:
    """python-multipart callbacks that keep the parts named `field` (their file names and bytes), at most `most`."""

    def __init__(self, field: str, most: int = 1):
        self.field, self.most, self.parts = field, most, []
        self.header, self.value, self.name, self.headers = b"", b"", None, {}

    def callbacks(self) -> dict:
        return {"on_header_field": self.on_header_field, "on_header_value": self.on_header_value,
                "on_header_end": self.on_header_end, "on_headers_finished": self.on_headers_finished,
                "on_part_data": self.on_part_data}

    def on_header_field(self, data, start, end):
        self.header += data[start:end]

    def on_header_value(self, data, start, end):
        self.value += data[start:end]

    def on_header_end(self):
        self.headers[self.header.lower()] = self.value
        self.header, self.value = b"", b""

    def on_headers_finished(self):
        _, disp = parse_options_header(self.headers.get(b"content-disposition", b""))
        self.name = disp.get(b"name", b"").decode("utf-8", "replace")
        self.headers = {}
        if self.name == self.field:
            if len(self.parts) == self.most:
                raise (UploadError(422, "duplicate_field", f"the form has more than one '{self.field}' part; send "
                                   "exactly one (POST /segment/batch takes several, as 'images')") if self.most == 1
                       else UploadError(413, "too_many_files", f"more than {self.most} '{self.field}' parts; the "
                                        f"limit is {self.most} per request"))
            filename = disp.get(b"filename", b"").decode("utf-8", "replace")
            self.parts.append((filename or f"{self.field}-{len(self.parts) + 1}", bytearray()))

    def on_part_data(self, data, start, end):
        if self.name == self.field:
            self.parts[-1][1].extend(data[start:end])


async def read_body(request: Request, max_bytes: int, timeout_s: float, sink: Callable[[bytes], object]) -> None:
    """Feed the body to `sink` chunk by chunk as it arrives: 413 past `max_bytes`, 408 past `timeout_s`."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise UploadError(413, "too_large", f"the request body is {declared} bytes; the limit is {max_bytes} bytes")
    received = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_bytes:
                    raise UploadError(413, "too_large", f"the request body passed the limit of {max_bytes} bytes")
                sink(chunk)
    except TimeoutError:
        raise UploadError(408, "body_timeout", f"the request body did not arrive within {timeout_s:g} s "
                          f"({received} bytes came); send it faster or in one go") from None


async def read_file_parts(request: Request, max_bytes: int, timeout_s: float, field: str,
                          most: int) -> list[tuple[str, bytes]]:
    """The multipart parts named `field` as (file name, bytes), in upload order, at most `most` of them."""
    files = await read_multipart(request, max_bytes, timeout_s, FileParts(field, most),
                                 f", or as JSON {{\"{field}\": \"<base64>\"}}" if most == 1 else "")
    return [(name, bytes(data)) for name, data in files.parts]


class SpooledPart(FileParts):
    """The one part named `field`, written to `file` as it arrives instead of kept in memory (a video)."""

    def __init__(self, field: str, file):
        super().__init__(field, 1)
        self.file = file

    def on_part_data(self, data, start, end):
        if self.name == self.field:
            self.file.write(data[start:end])


async def read_multipart(request: Request, max_bytes: int, timeout_s: float, files: FileParts,
                         alternative: str = "") -> FileParts:
    """Feed the body to `files` (python-multipart callbacks) while it streams in; 422 without a `files.field` part."""
    field = files.field
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError(422, "missing_field", f"send the file as multipart/form-data in a field named '{field}'"
                          + alternative)
    try:
        parser = MultipartParser(params[b"boundary"], files.callbacks())
    except (MultipartParseError, ValueError) as e:  # e.g. a boundary over 256 characters (RFC 2046's limit is 70)
        raise UploadError(422, "malformed_multipart", f"the multipart boundary is not usable ({e})") from None

    def write(chunk: bytes) -> None:
        try:
            parser.write(chunk)
        except MultipartParseError as e:
            raise UploadError(422, "malformed_multipart", f"the multipart body could not be parsed ({e})") from None

    await read_body(request, max_bytes, timeout_s, write)
    if not files.parts:
        raise UploadError(422, "missing_field", f"no '{field}' field in the form; send the file as '{field}'")
    return files


async def read_image_field(request: Request, max_bytes: int, timeout_s: float, field: str = "image") -> bytes:
    """The image bytes of a multipart form's one `field`, or of a JSON body {"image": "<base64>"}."""
    if parse_options_header(request.headers.get("content-type", ""))[0] == b"application/json":
        return await read_json_image(request, max_bytes, timeout_s, field)
    return (await read_file_parts(request, max_bytes, timeout_s, field, most=1))[0][1]


async def read_json_image(request: Request, max_bytes: int, timeout_s: float, field: str = "image") -> bytes:
    """{"image": "<base64>"}: the cap counts the JSON body as sent, before base64 decoding."""
    body = bytearray()
    await read_body(request, max_bytes, timeout_s, body.extend)
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UploadError(422, "invalid_json", f"the body is not valid JSON ({e})") from None
    if not isinstance(document, dict) or not isinstance(document.get(field), str):
        raise UploadError(422, "missing_field", f"send a JSON object {{\"{field}\": \"<base64 image>\"}}")
    try:
        return base64.b64decode(document[field], validate=True)
    except (binascii.Error, ValueError) as e:
        raise UploadError(422, "invalid_base64", f"'{field}' is not valid base64 ({e})") from None
