"""The organization's own rules for which runs it executes; a refusal names the rule that refused.

Image rules are applied twice. `image_gate` looks at the image reference alone, before the container engine
is asked anything about it: a name no rule admits is never looked up nor pulled, so a task (or an algorithm's
subtask) cannot make the node contact a registry its operator did not list. `check_run` then applies every
rule to the verified run, with the image's ID as the engine reports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vfed.node.config import ImagePolicy, NodeSettings

IMAGE_REFUSED = "image-not-allowed"
"""The classified code an image refusal starts with (`<code>: <message>`, as trust refusals)."""


ALLOWS_EVERY_IMAGE = (
    "policies.allowed_images is not set: this node runs any image a collaboration member (or an algorithm, "
    "through a subtask) names; list the images it may run (`vnode new --allow-image`, docs/vnode.md)"
)
"""The warning at start and in `vnode list` for a node without image rules (configs older than `vnode new`'s
deny-by-default policy)."""


@dataclass(frozen=True)
class Decision:
    """Whether a run may start, why not, and its wall-clock limit when it may."""

    allowed: bool
    reason: str = ""
    max_run_time_s: float = 0.0
    unchecked_outputs: bool = False
    """Outputs the node cannot check for disclosure are released (the image rule's `unchecked_outputs`)."""


@dataclass(frozen=True)
class ImageGate:
    """What the engine may be asked about an image before the run's checks: look it up, and pull it."""

    lookup: bool
    pull: bool
    reason: str = ""


def allows_every_image(settings: NodeSettings) -> bool:
    """No `policies.allowed_images` at all: any image anyone names runs here (warned about at start)."""
    return settings.policies.allowed_images is None


def image_gate(settings: NodeSettings, image: str) -> ImageGate:
    """Before any engine call for this image: may it be looked up, and pulled when missing?

    A reference a glob or a pinned digest admits may be pulled (when the runtime pulls at all). Where only
    digest rules could admit it (a tag whose image ID only the engine knows), it is looked up among the local
    images but never pulled: a pull would reach whatever registry the name points at.
    """
    rules = settings.policies.allowed_images
    if rules is None or any(r.matches_name(image) for r in rules):
        return ImageGate(lookup=True, pull=True)
    if any(r.by_digest for r in rules):
        return ImageGate(lookup=True, pull=False)
    return ImageGate(
        lookup=False,
        pull=False,
        reason=f"{IMAGE_REFUSED}: image {image} is not in this node's allowed_images "
        "(refused before any lookup or pull)",
    )


def subtask_image_refusal(settings: NodeSettings, image: str, root_organization: int | None) -> str | None:
    """Why the run's proxy refuses a subtask naming this image for this root initiator (the message of its
    `image-not-allowed` answer), or None.

    The proxy decides from the name alone (it asks no engine): a tag that only a digest rule could admit is
    refused; a subtask of the run's own image is not checked here (the node checked it for this very chain).
    """
    rules = settings.policies.allowed_images
    if rules is None:
        return None
    if any(r.matches_name(image) and r.for_organization(root_organization) for r in rules):
        return None
    return f"image {image} is not in this node's allowed_images for tasks of organization {root_organization}"


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
    organization that proxied it is held to the same list when it names a user. An image rule that lists
    organizations admits the image only for tasks whose root initiator is one of them.
    """
    policies = settings.policies
    limit = settings.max_run_time_s
    unchecked = policies.unchecked_outputs
    if policies.allowed_images is not None:
        root = initiators[-1][0] if initiators else None
        rule = _image_rule(policies.allowed_images, image, digest, root)
        if rule is None:
            shown = f"{image} ({digest})" if digest else image
            return Decision(
                False, f"{IMAGE_REFUSED}: image {shown} is not in this node's allowed_images{_for(root)}"
            )
        if rule.max_run_time_s is not None:
            limit = rule.max_run_time_s
        if rule.unchecked_outputs is not None:
            unchecked = rule.unchecked_outputs
    orgs = policies.allowed_organizations
    for org, _ in initiators:
        if orgs is not None and org not in orgs:
            return Decision(False, f"initiating organization {org} is not allowed")
    users = policies.allowed_users
    for number, (_, user) in enumerate(initiators, 1):
        root_user = number == len(initiators)
        if users is not None and (root_user or user is not None) and user not in users:
            return Decision(False, f"initiating user {user} is not allowed")
    return Decision(True, "", limit, unchecked == "allow")


def _image_rule(
    rules: Sequence[ImagePolicy], image: str, digest: str | None, root: int | None
) -> ImagePolicy | None:
    return next((r for r in rules if r.matches(image, digest) and r.for_organization(root)), None)


def _for(root: int | None) -> str:
    return f" for tasks of organization {root}" if root is not None else ""
