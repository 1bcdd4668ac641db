"""Streaming reader for one big top-level JSON object (a COCO / LVIS annotation file).

``json.load`` on LVIS v1 train (1.1 GB) builds many GB of Python objects at once. This reader
walks the top-level object in chunks with the stdlib decoder: the members named in ``arrays``
are yielded element by element, every other member whole. Memory is one chunk plus one element,
whatever the file size. Usage::

    for key, value in iter_members(uri, arrays=("annotations",)):
        ...  # ("info", {...}), ("annotations", {...one annotation...}), ...

It is the one JSON reader of every input entry point (prepare, export, the hold-out split, the
val json for stage 2, ``python -m exits.evaluate``): :func:`loads` for a whole document, with the
same rules as the stream: a UTF-8 byte-order mark is accepted (and skipped), a key repeated in
one object is refused (standard readers keep the last one, a streaming reader could see both),
and nesting deeper than :data:`MAX_DEPTH` is refused; each a one-line ``ValueError``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from exits import storage

CHUNK_BYTES = 16 << 20  # read size; an element larger than this just takes several reads
_WS = " \t\r\n"
BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark: accepted at the start, skipped
# nesting levels of a document (COCO needs 5: top, list, annotation, polygons, polygon)
MAX_DEPTH = 32


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """``object_pairs_hook``: a dict, or ValueError when a key repeats."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {dup[:80]!r} in one object")
    return out


def decoder() -> json.JSONDecoder:
    """The stdlib decoder with duplicate keys refused."""
    return json.JSONDecoder(object_pairs_hook=_unique_keys)


def check_depth(value: Any, brackets: int | None = None, level: int = 1) -> None:
    """ValueError when ``value``, found at nesting ``level`` of its document (1: the top),
    nests deeper than :data:`MAX_DEPTH`. ``brackets``: the number of ``[`` and ``{`` in its JSON
    text, when known: few enough settles it without walking the value (at C speed)."""
    if brackets is not None and level - 1 + brackets <= MAX_DEPTH:
        return
    stack = [(value, level)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            if depth > MAX_DEPTH:
                raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))


def loads(data: bytes | str, source: str = "json") -> Any:
    """Parse a whole JSON document by the rules of this module (BOM skipped, duplicate keys and
    nesting deeper than :data:`MAX_DEPTH` refused); ValueError ``"<source> is not valid JSON:
    ..."`` in one line."""
    try:
        if isinstance(data, bytes):
            data = data[len(BOM) :] if data.startswith(BOM) else data
            text = data.decode("utf-8")
        else:
            text = data[1:] if data.startswith("\ufeff") else data
        value, end = decoder().raw_decode(text, len(text) - len(text.lstrip(_WS)))
        if text[end:].strip(_WS):
            raise ValueError(f"extra data after the document at offset {end}")
        check_depth(value, text.count("[") + text.count("{"))
        return value
    except RecursionError:
        raise ValueError(
            f"{source} is not valid JSON: nested deeper than {MAX_DEPTH} levels"
        ) from None
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{source} is not valid JSON: not UTF-8 ({e.reason} at byte {e.start})"
        ) from None
    except ValueError as e:  # JSONDecodeError included
        raise ValueError(f"{source} is not valid JSON: {e}") from None


class _Buffer:
    """Text read so far from a byte stream, consumed from the front."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.text = ""
        self.pos = 0
        self.eof = False
        self.pending = b""  # bytes of a UTF-8 character split across two reads
        self.started = False
        self.level = 2  # nesting level of the values read: members of the top-level object

    def more(self) -> bool:
        if self.eof:
            return False
        data = self.pending + self.stream.read(CHUNK_BYTES)
        if not self.started:
            self.started = True
            if data.startswith(BOM):
                data = data[len(BOM) :]
            elif BOM.startswith(data) and data:  # a read shorter than the mark: rare, finish it
                data += self.stream.read(len(BOM))
                data = data[len(BOM) :] if data.startswith(BOM) else data
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
            brackets = self.text.count("[", self.pos, end) + self.text.count("{", self.pos, end)
            check_depth(obj, brackets, self.level)
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
    dec = decoder()
    fs, path = storage.get_filesystem(uri)
    seen: set[str] = set()
    with fs.open_input_stream(path) as stream:
        buf = _Buffer(stream)
        try:
            if buf.peek() != "{":  # decode it only to name what it is (hostile input)
                top = buf.value(dec)
                kind = "null" if top is None else type(top).__name__
                raise ValueError(f"the top level must be a JSON object, got {kind}")
            buf.pos += 1
            if buf.peek() == "}":
                return
            while True:
                key = buf.value(dec)
                if not isinstance(key, str):
                    raise ValueError("is not valid JSON: object key is not a string")
                if key in seen:  # standard readers keep the last one; refused everywhere
                    raise ValueError(
                        f"is not valid JSON: duplicate key {key[:80]!r} at the top level"
                    )
                seen.add(key)
                buf.expect(":")
                if key in arrays and buf.peek() == "[":
                    buf.pos += 1
                    buf.level = 3  # elements of a top-level array
                    if buf.peek() == "]":
                        buf.pos += 1
                    else:
                        while True:
                            yield key, buf.value(dec)
                            if buf.peek() == "]":
                                buf.pos += 1
                                break
                            buf.expect(",")
                    buf.level = 2
                elif key in arrays:
                    v = buf.value(dec)
                    kind = "null" if v is None else type(v).__name__
                    raise ValueError(f"{key!r} must be a list, got {kind}")
                else:
                    yield key, buf.value(dec)
                if buf.peek() == "}":
                    break
                buf.expect(",")
        except json.JSONDecodeError as e:
            raise ValueError(f"is not valid JSON: {e}") from e
        except RecursionError:
            raise ValueError(f"is not valid JSON: nested deeper than {MAX_DEPTH} levels") from None
        except ValueError as e:
            if str(e).startswith(("duplicate key", "nested deeper")):
                raise ValueError(f"is not valid JSON: {e}") from None
            raise
