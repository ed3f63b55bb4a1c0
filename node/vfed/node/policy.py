"""The organization's own rules for which runs it executes; a refusal names the rule that refused."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vfed.node.config import NodeSettings


@dataclass(frozen=True)
class Decision:
    """Whether a run may start, why not, and its wall-clock limit when it may."""

    allowed: bool
    reason: str = ""
    max_run_time_s: float = 0.0


def check_run(
    settings: NodeSettings,
    *,
    image: str,
    digest: str | None,
    initiators: Sequence[tuple[int | None, int | None]],
) -> Decision:
    """Apply the image, organization and user rules in that order.

    `initiators` are (organization, user) pairs, the task's own first and its root's last (a subtask's chain
    up to the researcher): every organization must be allowed; the root must name an allowed user, and an
    organization that proxied it is held to the same list when it names a user.
    """
    policies = settings.policies
    limit = settings.max_run_time_s
    if policies.allowed_images is not None:
        rule = next((r for r in policies.allowed_images if r.matches(image, digest)), None)
        if rule is None:
            shown = f"{image} ({digest})" if digest else image
            return Decision(False, f"image {shown} is not in this node's allowed_images")
        if rule.max_run_time_s is not None:
            limit = rule.max_run_time_s
    orgs = policies.allowed_organizations
    for org, _ in initiators:
        if orgs is not None and org not in orgs:
            return Decision(False, f"initiating organization {org} is not allowed")
    users = policies.allowed_users
    for number, (_, user) in enumerate(initiators, 1):
        root = number == len(initiators)
        if users is not None and (root or user is not None) and user not in users:
            return Decision(False, f"initiating user {user} is not allowed")
    return Decision(True, "", limit)
