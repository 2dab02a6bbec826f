"""Fetching image URLs for ``/v1/embeddings``: only from hosts the operator named, never by default.

A server that fetches whatever URL a client sends can be made to read the
operator's internal network (server-side request forgery). So a URL is refused
unless its host is on the operator's allowlist (``steadyclip serve
--allow-url-host images.example.com``); redirects are not followed (a redirect
could leave the allowlist), only http(s) is spoken, and the body is capped at the
request size limit while it streams in.
"""
from __future__ import annotations

from urllib.parse import urlsplit

from steadyclip.errors import ImageSourceError

__all__ = ["URL_PREFIXES", "fetch_image", "host_allowed"]

URL_PREFIXES = ("http://", "https://")
FETCH_TIMEOUT_S = 10.0


def host_allowed(url: str, allowed: tuple[str, ...]) -> bool:
    """Is ``url`` http(s) with a host (or ``host:port``) on the allowlist?"""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        return False
    host = parts.hostname.lower()
    with_port = f"{host}:{parts.port}" if parts.port else host
    return host in allowed or with_port in allowed


def fetch_image(url: str, allowed: tuple[str, ...], max_bytes: int) -> bytes:
    """The bytes at ``url``; :class:`ImageSourceError` for a refused host, a failed fetch or a too-big body."""
    import httpx

    if not host_allowed(url, allowed):
        raise ImageSourceError(f"{url[:200]!r}: this server fetches only from the hosts its operator allowed "
                               f"({', '.join(allowed) or 'none'}); send the image as a base64 data URI instead")
    try:
        with httpx.stream("GET", url, timeout=FETCH_TIMEOUT_S, follow_redirects=False) as resp:
            if resp.status_code != 200:
                raise ImageSourceError(f"fetching {url[:200]!r} answered HTTP {resp.status_code} "
                                       "(redirects are not followed); check the URL")
            chunks, size = [], 0
            for chunk in resp.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise ImageSourceError(f"{url[:200]!r} is larger than this server's {max_bytes}-byte limit")
                chunks.append(chunk)
    except httpx.HTTPError as e:
        raise ImageSourceError(f"could not fetch {url[:200]!r}: {type(e).__name__}: {e}") from e
    if not chunks:
        raise ImageSourceError(f"{url[:200]!r} returned an empty body")
    return b"".join(chunks)
