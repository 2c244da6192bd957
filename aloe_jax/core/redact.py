"""Secrets out of what is logged or recorded: an endpoint URL may carry an API key as its userinfo
(`https://user:KEY@host/v1`) or in its query string (`?api_key=KEY`); everything aloe-jax writes names endpoints
through `redact_urls`."""

from __future__ import annotations

import re
import urllib.parse

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def _redact_url(url: str) -> str:
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
    except ValueError:  # not a URL after all (an unbalanced "[" in the host): nothing can be told apart
        return url.split("://", 1)[0] + "://(redacted)"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def redact_urls(text: str) -> str:
    """`text` with every URL in it stripped of userinfo, query string and fragment (scheme, host, port, path kept)."""
    return _URL.sub(lambda match: _redact_url(match.group(0)), text)
