"""Who may use the studio: a Host allow-list, an Origin check and, off loopback, a token (``cmkit serve``).

Three checks on every HTTP request and WebSocket handshake, in this order (:meth:`Access.refusal`):

1. **Host** (status 421): the ``Host`` header must name the address the studio listens on, with its port:
   127.0.0.1, localhost, [::1], or the ``--host`` given. A web page that rebinds its own name to 127.0.0.1 (DNS
   rebinding) sends its own name and is refused. A studio listening on every interface (``--host 0.0.0.0`` or
   ``::``) cannot know the names it is reached by, so there the token alone decides.
2. **Origin** (status 403): a request that carries an ``Origin`` (browsers send one with every WebSocket
   handshake, upload and cross-site request) must come from the studio's own page: ``http://`` + the request's
   ``Host``. A request without one comes from a script or a test, not a web page.
3. **Token** (status 403): when the studio has one (always off loopback; ``--token`` on loopback), every request
   carries it, as ``?token=`` (the page passes on the one in its URL) or ``Authorization: token ...``.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs

from cmkit.errors import CmkitError

LOOPBACK = ("127.0.0.1", "localhost", "::1")  # the names of this machine a browser sends as Host
WILDCARDS = ("0.0.0.0", "::", "")  # addresses that listen on every interface  # noqa: S104 (the names, not a bind)
TOKEN_BYTES = 24  # entropy of a generated token (32 URL-safe characters)


def host_header(name: str, port: int) -> str:
    """What a browser sends as ``Host`` for ``name``:``port`` (IPv6 addresses in brackets)."""
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


def check_token(token: str | None) -> None:
    """A token given by the user is a non-empty string without spaces."""
    if token is not None and (not token or token != token.strip() or " " in token):
        raise CmkitError(f"--token {token!r}: expected a non-empty string without spaces")


@dataclass(frozen=True)
class Access:
    """The studio's access rules.

    Attributes:
        hosts: the accepted ``Host`` values, lower case, each with its port; None: any (a wildcard listener,
            protected by its token).
        token: the token every request must carry, or None (a loopback studio without ``--token``).
    """

    hosts: frozenset[str] | None
    token: str | None

    @classmethod
    def listening(cls, host: str, port: int, token: str | None = None) -> Access:
        """The rules for a studio listening on ``host``:``port``: a token is required off loopback (``token``,
        or a random one) and wherever ``token`` is given."""
        check_token(token)
        loopback = host in LOOPBACK
        if not loopback and token is None:
            token = secrets.token_urlsafe(TOKEN_BYTES)
        names = None if host in WILDCARDS else {*LOOPBACK, host}
        hosts = None if names is None else frozenset(host_header(n, port).lower() for n in names)
        return cls(hosts, token)

    def url(self, name: str, port: int) -> str:
        """The page's address, with the token when there is one (as Jupyter prints it)."""
        return f"http://{host_header(name, port)}/" + (f"?token={self.token}" if self.token else "")

    def query(self) -> str:
        """The query string asset links of the page carry: ``?token=...`` or empty."""
        return f"?token={self.token}" if self.token else ""

    def refusal(self, headers: Mapping[str, str], query_string: str) -> tuple[int, str] | None:
        """``(status, reason)`` when a request with ``headers`` (lower-case names) and ``query_string`` is
        refused, else None."""
        host = headers.get("host", "").lower()
        if self.hosts is not None and host not in self.hosts:
            return 421, f"Host {host or '(none)'!r} is not this studio's address ({', '.join(sorted(self.hosts))})"
        origin = headers.get("origin")
        if origin is not None and origin.lower() != f"http://{host}":
            return 403, f"Origin {origin!r} is not this studio's page (http://{host})"
        if self.token is not None and not self._has_token(headers, query_string):
            return 403, "the studio needs its token: open the URL it printed (with ?token=...)"
        return None

    def _has_token(self, headers: Mapping[str, str], query_string: str) -> bool:
        given = parse_qs(query_string).get("token", [])  # every value given
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "token":
            given.append(value.strip())
        return any(secrets.compare_digest(g.encode(), self.token.encode()) for g in given)
