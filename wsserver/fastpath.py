"""``POST /notify`` requests the worker serves without gunicorn's parser, environ and
response writer: the parts of a plain, complete, unambiguous request that the poller already
read, turned into the WSGI environ :class:`~wsserver.notify.NotifyEndpoint` reads, and its
answer written back as one buffer. No gunicorn and no sockets here: :mod:`wsserver.worker`
drives it.

Why: a publish is a few hundred bytes, read whole by the poller before any thread sees it
(:func:`wsserver.intake.request_end`), yet gunicorn parsed it again on the pool thread (its
``Request`` reads the socket through an unreader, checks every header against its proxy
policy), built its full environ, and wrote the answer in two ``sendall`` calls (head, then
body). With 100 clients connected that was about 35 % of the worker's GIL time per POST
(the profile is in docs/performance.md, "Publish path"); the fan-out itself is cheap.

What is served here must mean exactly what gunicorn would make of it, so the rule is to
take only what is unambiguous and leave everything else to gunicorn untouched:
``POST /notify HTTP/1.1`` with no query, header names that are plain tokens without ``_``,
values of visible ASCII, no header twice, ``Host``, one ``Content-Length`` and no
``Transfer-Encoding``/``Expect``/``Upgrade``/``Forwarded`` or scheme header, ``Connection``
absent, ``keep-alive`` or ``close``, within gunicorn's header count and size limits. Anything else
(a refusal gunicorn would answer, a proxy-dependent scheme, an obs-fold) returns None and
takes gunicorn's path, which answers it as before. The answer's head is gunicorn's: status
line, ``Server``, ``Date``, ``Connection``, then the app's headers.

Thread-safety: pure functions and immutable values; :func:`http_date` caches one string per
second (a benign race: two threads may both format it).
"""

from __future__ import annotations

import io
import re
import time
from email.utils import formatdate
from typing import Any, NamedTuple

__all__ = [
    "GUNICORN_ONLY",
    "NotifyRequest",
    "environ_for",
    "http_date",
    "parse_notify_request",
    "response_bytes",
]

_REQUEST_LINE = b"POST /notify HTTP/1.1\r\n"
# a token (RFC 9110 tchar) without "_" (gunicorn drops or refuses those), ":", optional
# whitespace, a value of visible ASCII with single inner spaces/tabs, optional whitespace
_FIELD = re.compile(
    rb"([!#$%&'*+.^`|~0-9A-Za-z-]+):[ \t]*((?:[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*)?)[ \t]*"
)
# fields whose meaning depends on gunicorn's proxy, upgrade or body handling: gunicorn decides
GUNICORN_ONLY = frozenset(
    {
        "TRANSFER-ENCODING",
        "EXPECT",
        "UPGRADE",
        "HTTP2-SETTINGS",
        "FORWARDED",
        "X-FORWARDED-PROTO",
        "X-FORWARDED-PROTOCOL",
        "X-FORWARDED-SSL",
        "SCRIPT-NAME",
        "TE",
    }
)


class NotifyRequest(NamedTuple):
    """A complete ``POST /notify`` request: its headers as gunicorn lists them (upper-case
    names, values stripped), its body, and whether the client asked to close."""

    headers: list[tuple[str, str]]
    body: bytes
    close: bool


def parse_notify_request(
    data: bytes | bytearray,
    head_end: int,
    end: int,
    max_fields: int,
    max_field_size: int,
    gunicorn_only: frozenset[str] = GUNICORN_ONLY,
) -> NotifyRequest | None:
    """The request in ``data[:end]`` (head up to ``head_end``, body after it), or None when
    it is not one this module may serve (see the module docstring): then gunicorn parses it.

    ``max_fields``/``max_field_size``: gunicorn's ``limit_request_fields`` and
    ``limit_request_field_size``; a request past them is gunicorn's to refuse.
    ``gunicorn_only``: upper-case field names that send the request to gunicorn
    (:data:`GUNICORN_ONLY` plus the worker's ``secure_scheme_headers``)."""
    if not data.startswith(_REQUEST_LINE):
        return None
    lines = bytes(data[len(_REQUEST_LINE) : head_end - 4]).split(b"\r\n")
    if len(lines) > max_fields:
        return None
    headers: list[tuple[str, str]] = []
    seen: set[str] = set()
    length = None
    close = False
    for line in lines:
        if len(line) > max_field_size:
            return None
        match = _FIELD.fullmatch(line)
        if match is None:
            return None
        name = match.group(1).decode("ascii").upper()
        if name in seen or name in gunicorn_only:
            return None
        seen.add(name)
        value = match.group(2).decode("ascii")
        if name == "CONTENT-LENGTH":
            if not value.isdigit() or len(value) > 15:
                return None
            length = int(value)
        elif name == "CONNECTION":
            token = value.lower()
            if token == "close":
                close = True
            elif token != "keep-alive":
                return None
        headers.append((name, value))
    if length is None or head_end + length != end or "HOST" not in seen:
        return None
    return NotifyRequest(headers, bytes(data[head_end:end]), close)


def environ_for(
    request: NotifyRequest, client: Any, server: Any, base: dict[str, Any]
) -> dict[str, Any]:
    """The environ gunicorn's ``wsgi.create`` builds for ``request`` (the keys
    :class:`~wsserver.notify.NotifyEndpoint`, wsserver's refusal answers and gunicorn's
    access log read), on top of ``base`` (the per-worker constant keys)."""
    environ = dict(base)
    environ["wsgi.input"] = io.BytesIO(request.body)
    for name, value in request.headers:
        if name == "CONTENT-TYPE":
            environ["CONTENT_TYPE"] = value
        elif name == "CONTENT-LENGTH":
            environ["CONTENT_LENGTH"] = value
        else:
            environ["HTTP_" + name.replace("-", "_")] = value
    if isinstance(client, tuple):
        environ["REMOTE_ADDR"] = client[0]
        environ["REMOTE_PORT"] = str(client[1])
    else:
        environ["REMOTE_ADDR"] = client.decode() if isinstance(client, bytes) else str(client)
    if isinstance(server, tuple):
        environ["SERVER_NAME"] = str(server[0])
        environ["SERVER_PORT"] = str(server[1])
    return environ


_date: list = [0, ""]


def http_date() -> str:
    """gunicorn's ``Date`` value, formatted once per second."""
    now = int(time.time())
    cached = _date
    if cached[0] != now:
        cached[1] = formatdate(now, localtime=False, usegmt=True)
        cached[0] = now
    return cached[1]


def response_bytes(
    status: str, headers: list[tuple[str, str]], body: bytes, close: bool, server: str
) -> bytes:
    """The answer gunicorn writes for a response with a ``Content-Length`` (which every
    :func:`~wsserver.errors.wsgi_json` answer has), as one buffer."""
    head = [
        f"HTTP/1.1 {status}\r\nServer: {server}\r\nDate: {http_date()}\r\n"
        f"Connection: {'close' if close else 'keep-alive'}\r\n"
    ]
    head.extend(f"{name}: {value}\r\n" for name, value in headers)
    head.append("\r\n")
    return "".join(head).encode("latin-1") + body
