"""Credentials out of URLs, DSNs and error texts: the one definition camgraph uses
wherever a camera URL, a media URL or a database/Redis DSN is shown (status, logs,
errors). Pure: imports nothing of the project.

What is masked (replaced by `***`):
- the password of a URL's userinfo (`rtsp://admin:***@cam:554/s`). The userinfo ends
  at the LAST `@` of the authority, so a password holding `@` is masked whole. A raw
  `/`, `?` or `#` in a password ends the authority early: so where the authority holds
  a `:` and another `@` follows (before any `=`), the userinfo runs to that last `@`
  (`http://u:p@cam/users/me@x.com` then shows as `http://u:***@x.com`: more is masked,
  nothing leaks). The user name is kept (not a secret, and it helps an operator
  recognise the camera). `scheme://user:secret` with no host masks the "port".
- the values of query and fragment parameters whose names look like secrets
  (`pwd`, `pass…`, `token`, `secret`, `auth…`, `key`, `api_key`, `sig…`, `session…`,
  `credential…`, …; see `is_secret_name`). `user`/`username` are kept, as in the
  userinfo. A non-secret parameter whose value is itself a URL or DSN with a secret
  (`?next=rtsp://u:p@h/`) is masked whole.
- libpq `key=value` DSN entries with a secret key (`password=***`, quoted values too).
- in free text (error messages): every embedded URL and `key=value` as above, and
  `user:password@host` without a scheme.

Scheme, host, port, path and the other parameters stay as they were (not re-encoded).
Nothing here raises: on input it cannot make sense of, it masks conservatively.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, unquote_plus

__all__ = ["MASK", "is_secret_name", "redact", "redact_text", "secrets_in"]

MASK = "***"
MIN_SCRUBBED = 3  # secrets this long or longer are masked wherever they appear in a text

# Parameter names holding one of these (separators and case ignored) are secrets.
_SECRET_SUBSTRINGS = (
    "pass",  # pass, password, passwd, passphrase
    "pwd",
    "token",  # token, access_token, id_token
    "secret",
    "auth",  # auth, authorization, authkey
    "credential",
    "session",  # session, sessionid
    "signature",
    "apikey",
    "privatekey",
    "cookie",
    "bearer",
)
# ... and names with one of these as a whole word (`key`, `api-key`, `X-Amz-Sig`).
_SECRET_WORDS = frozenset({"key", "sig", "pw", "psk", "sid", "hmac", "otp", "jwt"})

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_AUTHORITY_END = re.compile(r"[/?#]")
_BLANK = re.compile(r"\s")
# In free text: a URL (up to a blank or a quote), a key=value pair (libpq quoting), or
# a scheme-less `user:password@host`.
_IN_TEXT = re.compile(
    r"(?<![A-Za-z0-9+.\-])(?P<url>[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+)"
    r"|(?<![\w.\-])(?P<key>[A-Za-z_][\w.\-]*)\s*=\s*"
    r"(?P<value>'(?:[^'\\]|\\.)*'?|\"(?:[^\"\\]|\\.)*\"?|[^\s&;=]*)"
    r"|(?<![\w.+\-/:@%])(?P<user>[\w.+\-%~!$&*]+):(?P<password>[^\s'\"]*)@(?=[\w\[])"
)


def is_secret_name(name: str) -> bool:
    """Whether a parameter or DSN key of this name holds a secret (case-insensitive)."""
    try:
        text = unquote_plus(str(name))
        words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", text).lower()
        compact = re.sub(r"[^a-z0-9]", "", words)
        if any(s in compact for s in _SECRET_SUBSTRINGS):
            return True
        return any(w in _SECRET_WORDS for w in re.split(r"[^a-z0-9]+", words))
    except Exception:
        return True


def _bad_port(authority: str) -> bool:
    """An authority whose `:port` is not a number (maybe a password cut short)."""
    host = authority.rsplit("]", 1)[-1] if authority.startswith("[") else authority
    if ":" not in host:
        return False
    return not host.rsplit(":", 1)[1].isdigit()


def _param_spans(text: str, offset: int, depth: int) -> list[tuple[int, int]]:
    """Value spans (absolute) of the secret `name=value` parameters of a query/fragment."""
    spans: list[tuple[int, int]] = []
    pos = 0
    for part in re.split(r"([&;])", text):
        if part in ("&", ";"):
            pos += 1
            continue
        name, eq, value = part.partition("=")
        start = offset + pos + len(name) + len(eq)
        if eq and value:
            if is_secret_name(name):
                spans.append((start, start + len(value)))
            elif depth < 3 and ("@" in value or "%40" in value.lower() or "=" in value):
                decoded = unquote_plus(value)
                if _redact(decoded, depth + 1) != decoded:  # a URL or DSN with a secret
                    spans.append((start, start + len(value)))
        pos += len(part)
    return spans


def _url_spans(url: str, start: int, depth: int = 0) -> list[tuple[int, int]]:
    """Secret spans of the URL whose authority begins at `start` (after `scheme://`)."""
    n = len(url)
    m = _AUTHORITY_END.search(url, start)
    end = m.start() if m else n
    at = url.rfind("@", start, end)
    if ":" in url[start:end]:
        # A password with a raw '/', '?' or '#' ends the authority early; its '@' comes
        # later, before any '=' (one after a '=' is a query value's, e.g. an e-mail).
        later = url.rfind("@", end, url.find("=", end) if "=" in url[end:] else n)
        if later >= 0:
            at = later
            m = _AUTHORITY_END.search(url, at)
            end = m.start() if m else n
    spans: list[tuple[int, int]] = []
    if at >= 0:
        colon = url.find(":", start, at)
        if colon >= 0 and colon + 1 < at:
            spans.append((colon + 1, at))
    elif _bad_port(url[start:end]) and not url[start:end].startswith("["):
        # `scheme://user:secret` with no host: the "port" may be a password.
        colon = url.rfind(":", start, end)
        if colon + 1 < end:
            spans.append((colon + 1, end))
    q = url.find("?", end)
    f = url.find("#", end)
    if q >= 0 and (f < 0 or q < f):
        query_end = f if f >= 0 else n
        spans += _param_spans(url[q + 1 : query_end], q + 1, depth)
    if f >= 0:
        spans += _param_spans(url[f + 1 :], f + 1, depth)
    return spans


def _mask(text: str, spans: list[tuple[int, int]]) -> str:
    """`text` with each span (overlapping ones merged) replaced by MASK."""
    pieces, done = [], 0
    for a, b in sorted(spans):
        if b <= a or (b <= done and a < done):
            continue  # empty, or inside the previous span
        if a < done:  # overlaps it: extend it
            done = b
            continue
        pieces += [text[done:a], MASK]
        done = b
    return "".join([*pieces, text[done:]])


def _text_spans(text: str, depth: int) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    pos = 0
    while (m := _IN_TEXT.search(text, pos)) is not None:
        pos = max(m.end(), pos + 1)
        if m.group("url") is not None:
            url = m.group("url")
            start = _SCHEME.match(url)
            offset = m.start("url")
            if start is not None:
                spans += [(offset + a, offset + b) for a, b in _url_spans(url, start.end(), depth)]
        elif m.group("key") is not None:
            if m.group("value") and is_secret_name(m.group("key")):
                # A secret runs to the next blank, as in a libpq DSN (`password=a&b=c`,
                # `password='a'b'`): the pattern stops it early for other keys' sake.
                blank = _BLANK.search(text, m.end("value"))
                end = blank.start() if blank is not None else len(text)
                spans.append((m.start("value"), max(end, m.end("value"))))
                pos = max(pos, end)
            else:  # `next=pwd=x`, `opt='-c password=x'`: look inside the value too
                pos = m.start("value")
        elif m.group("password"):
            spans.append(m.span("password"))
    return spans


def _spans(value: str, depth: int = 0) -> list[tuple[int, int]]:
    scheme = _SCHEME.match(value.lstrip())
    if scheme is not None:  # one URL, blanks and all
        offset = len(value) - len(value.lstrip())
        return _url_spans(value, offset + scheme.end(), depth)
    return _text_spans(value, depth)


def _redact(value: str, depth: int) -> str:
    return _mask(value, _spans(value, depth))


def redact(value: str) -> str:
    """A URL, DSN or text without its secrets (see the module's docstring).

    >>> redact("rtsp://admin:p@ss@cam:554/s?pwd=x&ch=1")
    'rtsp://admin:***@cam:554/s?pwd=***&ch=1'
    >>> redact("host=h password='a b' dbname=x")
    'host=h password=*** dbname=x'
    """
    try:
        text = value if isinstance(value, str) else str(value)
        return _redact(text, 0)
    except Exception:  # never raise where an error is being reported
        try:
            scheme = _SCHEME.match(str(value))
            return f"{scheme.group(0)}{MASK}" if scheme is not None else MASK
        except Exception:
            return MASK


def secrets_in(value: str) -> list[str]:
    """The secret strings of a URL or DSN, as written and percent-decoded, longest first
    (to find them where a library quoted them in its own message)."""
    try:
        text = value if isinstance(value, str) else str(value)
        found: set[str] = set()
        for a, b in _spans(text):
            raw = text[a:b]
            for form in (raw, unquote(raw), unquote_plus(raw)):
                stripped = form.strip("'\"")
                for s in (form, stripped):
                    if s and s.strip("*"):
                        found.add(s)
        return sorted(found, key=len, reverse=True)
    except Exception:
        return []


def redact_text(text: str, *sources: str) -> str:
    """`text` (e.g. a library's error message) without the secrets of `sources` (the
    URLs or DSNs it was about), wherever and however they appear in it, and without
    the secrets of any URL or DSN it holds."""
    try:
        out = text if isinstance(text, str) else str(text)
        for source in sources:
            if not source:
                continue
            source = str(source)
            shown = redact(source)
            for form in sorted({source, unquote(source)}, key=len, reverse=True):
                if form and form != shown:
                    out = out.replace(form, shown)
            for secret in secrets_in(source):
                # Shorter ones cannot be told from the message's own letters (and are
                # guessed at once anyway): where they sit in a URL or DSN, they are
                # masked below like any other.
                if len(secret) >= MIN_SCRUBBED:
                    out = out.replace(secret, MASK)
        return _mask(out, _text_spans(out, 0))
    except Exception:
        return MASK
