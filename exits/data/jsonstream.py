"""Streaming reader for one big top-level JSON object (a COCO / LVIS annotation file).

``json.load`` on LVIS v1 train (1.1 GB) builds many GB of Python objects at once. This reader
walks the top-level object in chunks with the stdlib decoder: the members named in ``arrays``
are yielded element by element, every other member whole. Memory is one chunk plus one element,
whatever the file size. Usage::

    for key, value in iter_members(uri, arrays=("annotations",)):
        ...  # ("info", {...}), ("annotations", {...one annotation...}), ...
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from exits import storage

CHUNK_BYTES = 16 << 20  # read size; an element larger than this just takes several reads
_WS = " \t\r\n"


class _Buffer:
    """Text read so far from a byte stream, consumed from the front."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.text = ""
        self.pos = 0
        self.eof = False
        self.pending = b""  # bytes of a UTF-8 character split across two reads

    def more(self) -> bool:
        if self.eof:
            return False
        data = self.pending + self.stream.read(CHUNK_BYTES)
        if len(data) == len(self.pending):
            self.eof = True
            if self.pending:
                raise ValueError("truncated UTF-8 at the end of the json")
            return False
        cut = len(data)
        while cut > 0 and cut > len(data) - 4 and (data[cut - 1] & 0xC0) == 0x80:
            cut -= 1  # back off continuation bytes ...
        if cut > 0 and data[cut - 1] >= 0xC0:
            cut -= 1  # ... and the lead byte of a multi-byte character cut in two
        self.text = self.text[self.pos :] + data[:cut].decode("utf-8")
        self.pending = data[cut:]
        self.pos = 0
        return True

    def peek(self) -> str:
        """Next non-whitespace character (consumes the whitespace); '' at the end."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more():
                return ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise ValueError(f"is not valid JSON: expected {char!r} near offset {self.pos}")
        self.pos += 1

    def value(self, decoder: json.JSONDecoder) -> Any:
        """Decode one JSON value at the cursor, reading more text until it is complete."""
        self.peek()
        while True:
            try:
                obj, end = decoder.raw_decode(self.text, self.pos)
            except json.JSONDecodeError:
                if self.more():
                    continue
                raise
            # a number at the buffer's end may continue in the next chunk
            if end == len(self.text) and not self.eof and self.more():
                continue
            self.pos = end
            return obj


def iter_members(
    uri: str, arrays: tuple[str, ...] = ("annotations", "images")
) -> Iterator[tuple[str, Any]]:
    """Yield ``(key, value)`` for the members of the top-level object of the json at ``uri``.

    Members named in ``arrays`` must be lists and are yielded one element at a time, as
    ``(key, element)``; an empty list yields nothing. Raises ValueError on malformed json, a top
    level that is not an object or an ``arrays`` member that is not a list.
    """
    decoder = json.JSONDecoder()
    fs, path = storage.get_filesystem(uri)
    with fs.open_input_stream(path) as stream:
        buf = _Buffer(stream)
        try:
            if buf.peek() != "{":  # decode it only to name what it is (hostile input)
                top = buf.value(decoder)
                kind = "null" if top is None else type(top).__name__
                raise ValueError(f"the top level must be a JSON object, got {kind}")
            buf.pos += 1
            if buf.peek() == "}":
                return
            while True:
                key = buf.value(decoder)
                if not isinstance(key, str):
                    raise ValueError("is not valid JSON: object key is not a string")
                buf.expect(":")
                if key in arrays and buf.peek() == "[":
                    buf.pos += 1
                    if buf.peek() == "]":
                        buf.pos += 1
                    else:
                        while True:
                            yield key, buf.value(decoder)
                            if buf.peek() == "]":
                                buf.pos += 1
                                break
                            buf.expect(",")
                elif key in arrays:
                    v = buf.value(decoder)
                    kind = "null" if v is None else type(v).__name__
                    raise ValueError(f"{key!r} must be a list, got {kind}")
                else:
                    yield key, buf.value(decoder)
                if buf.peek() == "}":
                    break
                buf.expect(",")
        except json.JSONDecodeError as e:
            raise ValueError(f"is not valid JSON: {e}") from e
