"""The one redaction: every text that leaves a process (manifest rows, `_SUCCESS`, MLflow tags and params,
reports, stdout/stderr) goes through `redact` (a URI) or `scrub` (free text such as an error message).

Hidden: the password of a URL (`user:***@host`), and the value of any `name=value` pair whose name looks like a
credential (`?token=`, `X-Amz-Signature=`, `aws_secret_access_key=`, ...), in URLs and in free text alike.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# a name is secret when one of its _ . - separated parts is one of these, or ends in one of the first four
SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "signature", "credential", "credentials", "sig",
                "auth", "authorization")
_PASSWORD = re.compile(r"(://[^/:@\s]+):[^@/\s]+@")
# name=value (or name: value / "name": "value") where the name holds a secret word
_SECRET_PAIR = re.compile(r"""(?i)\b([\w.-]*(?:key|secret|token|passw|sig|cred|auth)[\w.-]*)"""
                          r"""(["']?\s*[=:]\s*["']?)((?:bearer\s+|basic\s+)?[^&\s'",;)}\]]+)""")


def redact(uri: str | None) -> str | None:
    """A URI without its password and without query values that look like credentials (presigned URLs)."""
    if not uri or "://" not in uri:
        return scrub(uri) if uri else uri
    parts = urlsplit(uri)
    if "@" not in parts.netloc and not parts.query:
        return uri  # nothing to hide (and urlunsplit would drop the empty host of sqlite:////path)
    netloc = parts.netloc
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        netloc = f"{user.split(':', 1)[0]}:***@{host}" if ":" in user else f"{user}@{host}"
    query = [(k, "***" if _secret(k) else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe="*/:"), parts.fragment))


def scrub(text: str | None) -> str | None:
    """Free text (an error message, a traceback) without passwords of URLs or values of secret-named pairs."""
    if not text:
        return text
    text = _PASSWORD.sub(r"\1:***@", text)
    return _SECRET_PAIR.sub(lambda m: m.group(1) + m.group(2) + "***" if _secret(m.group(1)) else m.group(0), text)


def _secret(name: str) -> bool:
    parts = re.split(r"[_.\-]", name.lower())
    return any(p in SECRET_WORDS or p.endswith(SECRET_WORDS[:4]) for p in parts)
