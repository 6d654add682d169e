"""Reading an invitation mail: the texts of a MIME message, text/plain first, HTML as text.

Pure: no IO, no clock.  ``read`` takes the raw bytes of a whole mail (an ``.eml`` file, a saved
message with an mbox ``From`` line, or a message pasted with its headers) and returns the text of
its ``text/plain`` parts and of its ``text/html`` parts (tags removed, entities replaced), with
base64 and quoted-printable undone and each part decoded with its charset.  Input whose first
line is not a header is not a mail: ``read`` returns nothing and the caller reads it as text.

The standard library's ``email`` package reads each part's ``Content-Type`` parameters and
undoes its transfer encoding.  Finding the header block and splitting a multipart on its
boundary lines is done here with ``re`` and slicing, because ``email.parser`` is unfit for a
hostile mail: it recurses once per nesting level (``RecursionError`` at about a thousand) and
tests every line against every open boundary in Python (seconds per MiB).  Here the work is
linear in the input and bounded: at most ``MAX_PARTS`` parts are read, nested at most
``MAX_DEPTH`` deep, and a header field longer than ``MAX_FIELD`` characters is ignored.
"""

from __future__ import annotations

import codecs
import html
import re
from dataclasses import dataclass
from email.message import Message

__all__ = ["MAX_DEPTH", "MAX_FIELD", "MAX_PARTS", "Reading", "html_text", "read"]

MAX_DEPTH = 8
"""Multiparts and attached messages nested deeper than this are not read."""
MAX_PARTS = 64
"""At most this many parts (multiparts and attached messages included) are read."""
MAX_FIELD = 2000
"""A Content-Type or Content-Transfer-Encoding field longer than this is ignored (the email
package's parameter parser is quadratic in the number of parameters)."""
MAX_BOUNDARY = 200
"""RFC 2046 allows 70 characters; a multipart with a longer boundary is not split."""

_FIRST_HEADER = re.compile(r"(?:From [^\n]*\n)?(?=[!-9;-~]+[ \t]*:)")
_END_OF_HEADERS = re.compile(r"\n\r?\n")
_FIELD = re.compile(r"^(content-type|content-transfer-encoding)[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)",
                    re.IGNORECASE | re.MULTILINE)
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_TAG = re.compile(r"<[^<>]*>")
_BLOCK_TAG = re.compile(r"<\s*/?\s*(?:br|p|div|li|tr|h[1-6]|blockquote|pre|table)\b[^<>]*>",
                        re.IGNORECASE)
# A numeric reference of 8 digits or more; html.unescape raises on one of 5000 digits.
_LONG_REF = re.compile(r"&#([xX])0*([0-9a-fA-F]*)(?<=[0-9a-fA-F]{8});?|&#0*([0-9]*)(?<=[0-9]{8});?")
# Codecs whose decoders are quadratic in their input; a part claiming them is read as UTF-8.
_SLOW_CODECS = frozenset({"punycode", "idna"})


@dataclass(frozen=True, slots=True)
class Reading:
    """The texts of a mail, in document order within each kind."""

    plain: tuple[str, ...] = ()
    """The ``text/plain`` parts, decoded."""
    html: tuple[str, ...] = ()
    """The ``text/html`` parts as text (``html_text``)."""
    skipped: str = ""
    """Which parts were left unread, as a clause for the user ("" if none were)."""


def html_text(markup: str) -> str:
    """The text of an HTML document: block tags become line ends, other tags spaces, character
    references are replaced.  Linear in the input; never raises."""
    text = _TAG.sub(" ", _BLOCK_TAG.sub("\n", markup))
    text = _LONG_REF.sub(_short_ref, text)
    try:
        return html.unescape(text)
    except (ValueError, OverflowError):
        return text


def _short_ref(m: re.Match[str]) -> str:
    """A numeric character reference without leading zeros, or U+FFFD when no code point can
    have that many digits (so that ``html.unescape`` never converts a huge number)."""
    hexa, digits = m.group(1), m.group(2) if m.group(1) else m.group(3)
    if len(digits) > 7:
        return "\ufffd"
    return f"&#{hexa or ''}{digits or '0'};"


def read(data: bytes) -> Reading:
    """Split the mail ``data`` into its texts (see the module docstring).  Never raises."""
    # As the email package does with bytes: ASCII, and every other byte as a lone surrogate,
    # so that a part's payload goes back to its exact bytes before its charset decodes it.
    text = data.decode("ascii", "surrogateescape")
    first = _FIRST_HEADER.match(text)
    if first is None:
        return Reading()
    plain: list[str] = []
    markup: list[str] = []
    skipped = ""
    count = 0
    stack: list[tuple[str, int, str]] = [(text[first.end():], 0, "text/plain")]
    while stack:
        entity, depth, default = stack.pop()
        if depth > MAX_DEPTH:
            skipped = skipped or f"parts nested more than {MAX_DEPTH} levels deep were not read"
            continue
        count += 1
        if count > MAX_PARTS:
            skipped = f"only its first {MAX_PARTS} parts were read"
            break
        msg, body = _entity(entity, default)
        ctype = msg.get_content_type()
        if ctype.startswith("multipart/"):
            child_default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
            parts = _split(msg, body, MAX_PARTS - count + 1)
            stack.extend((part, depth + 1, child_default) for part in reversed(parts))
        elif ctype in ("message/rfc822", "message/global"):
            inner = _payload(msg, body).decode("ascii", "surrogateescape")
            stack.append((inner, depth + 1, "text/plain"))
        elif ctype == "text/plain":
            plain.append(_decode(msg, _payload(msg, body)))
        elif ctype == "text/html":
            markup.append(html_text(_decode(msg, _payload(msg, body))))
    return Reading(tuple(plain), tuple(markup), skipped)


def _entity(entity: str, default: str) -> tuple[Message, str]:
    """The MIME fields of one entity as a ``Message`` (no payload yet), and its body."""
    if entity.startswith(("\n", "\r\n")):
        head, body = "", entity[1 if entity[0] == "\n" else 2:]
    else:
        end = _END_OF_HEADERS.search(entity)
        head, body = (entity, "") if end is None else (entity[: end.start()], entity[end.end():])
    msg = Message()
    msg.set_default_type(default)
    for m in _FIELD.finditer(head):
        name, value = m.group(1).lower(), m.group(2)
        if len(value) <= MAX_FIELD and name not in {k.lower() for k in msg.keys()}:
            msg[name] = _FOLD.sub("", value).strip()
    return msg, body


def _split(msg: Message, body: str, limit: int) -> list[str]:
    """The parts of a multipart body between its boundary lines (at most ``limit``); the
    preamble and the epilogue are dropped.  No boundary, no parts."""
    boundary = msg.get_boundary()
    if not boundary or len(boundary) > MAX_BOUNDARY:
        return []
    line = re.compile(r"^--" + re.escape(boundary) + r"(--)?[ \t]*\r?$", re.MULTILINE)
    parts: list[str] = []
    start = -1
    for m in line.finditer(body):
        if start >= 0:
            parts.append(body[start : m.start()])
            if len(parts) >= limit:
                return parts
        if m.group(1):
            return parts
        start = m.end() + 1  # after the line end
    if start >= 0:
        parts.append(body[start:])  # no closing line: the last part runs to the end
    return parts


def _payload(msg: Message, body: str) -> bytes:
    """The body with base64 or quoted-printable undone (``Message.get_payload(decode=True)``);
    any other transfer encoding is taken as the body's bytes."""
    cte = str(msg.get("content-transfer-encoding", "")).strip().lower()
    if cte not in ("base64", "quoted-printable"):
        return body.encode("ascii", "surrogateescape")
    msg.set_payload(body)
    data = msg.get_payload(decode=True)
    return data if isinstance(data, bytes) else body.encode("ascii", "surrogateescape")


def _decode(msg: Message, data: bytes) -> str:
    """``data`` as text in the part's charset; UTF-8 (with U+FFFD for bad bytes) when the
    charset is missing, unknown, not a text encoding or slow to decode."""
    name = "utf-8"
    charset = msg.get_content_charset()
    if charset:
        try:
            info = codecs.lookup(charset)
        except (LookupError, ValueError):
            pass
        else:
            if info.name not in _SLOW_CODECS and getattr(info, "_is_text_encoding", True):
                name = info.name
    try:
        return data.decode(name, "replace")
    except (LookupError, UnicodeError, ValueError, TypeError):
        return data.decode("utf-8", "replace")
