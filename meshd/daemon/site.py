"""This site as its daemon knows it: name, the key holder, and where it can be reached."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshd.state.site import SiteKeys


@dataclass(slots=True)
class LocalSite:
    """Set up by the app at start: ``bound`` is the peer port actually bound (None for a site
    that can only dial out), ``addrs`` the addresses this site advertises in its record."""

    name: str
    keys: SiteKeys
    bound: str | None = None
    addrs: list[str] = field(default_factory=list)

    @property
    def public(self) -> bytes:
        return self.keys.public

    @property
    def reachable(self) -> bool:
        return self.bound is not None
