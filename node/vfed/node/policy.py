"""The organization's own rules for which runs it executes; a refusal names the rule that refused."""

from __future__ import annotations

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
    initiator_organization_id: int | None,
    initiator_user_id: int | None,
) -> Decision:
    """Apply the image, organization and user rules in that order."""
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
    if orgs is not None and initiator_organization_id not in orgs:
        return Decision(False, f"initiating organization {initiator_organization_id} is not allowed")
    users = policies.allowed_users
    if users is not None and initiator_user_id not in users:
        return Decision(False, f"initiating user {initiator_user_id} is not allowed")
    return Decision(True, "", limit)
