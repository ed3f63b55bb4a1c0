"""Which organizations belong to a collaboration, as the server lists them, kept between tasks.

Membership only: the keys inputs are sealed to come from the organizations' pinned key chains (trust.py).
"""

from __future__ import annotations

from vfed.client.http import ApiSession
from vfed.common.api.resources import Organization


class Members:
    """Member organization ids per collaboration, listed on first use and kept (refresh: listed again)."""

    def __init__(self, api: ApiSession) -> None:
        self.api = api
        self._members: dict[int, list[int]] = {}

    async def of(self, collaboration_id: int, refresh: bool = False) -> list[int]:
        """The ids of the collaboration's members the caller can see, in one request, then kept; an empty
        list (an unknown collaboration) is asked about again each time."""
        kept = self._members.get(collaboration_id)
        if not kept or refresh:
            query = {"collaboration_id": collaboration_id}
            orgs = await self.api.get_models("/organizations", Organization, query)
            kept = sorted(o.id for o in orgs)
            self._members[collaboration_id] = kept
        return list(kept)
