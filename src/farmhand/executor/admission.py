"""What the executor checks before it will act on an intent, whatever the producer claimed:
its signature, the agent's policy and, where a rule asks for them, valid approvals.

Each check returns the reason for refusing (the intent is dead-lettered with it) or None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from farmhand.contracts import Approval, Decision, Intent
from farmhand.errors import FarmhandError, Forbidden
from farmhand.store.base import Store

if TYPE_CHECKING:
    from farmhand.policy import ApprovalRule, Policy
    from farmhand.signing import Verifier


def approval_problem(
    approval: Approval, intent: Intent, rule: ApprovalRule, verifier: Verifier, now: float
) -> str | None:
    """Why ``approval`` does not authorise ``intent`` (None if it does)."""
    from farmhand.signing import verify

    if approval.intent_id != intent.id:
        return f"approval {approval.id} is for intent {approval.intent_id}"
    if approval.payload_hash != intent.payload_hash:
        return f"approval {approval.id} is for payload {approval.payload_hash}, not this one"
    if approval.approver not in rule.approvers:
        return f"approval {approval.id} is from {approval.approver!r}, who is not an approver"
    if approval.expires_at.timestamp() <= now:
        return f"approval {approval.id} by {approval.approver} expired at {approval.expires_at}"
    try:
        key = verify(approval, verifier, role="approver")
    except FarmhandError as exc:
        return f"approval {approval.id} by {approval.approver}: {exc}"
    if key.owner != approval.approver:
        return (
            f"approval {approval.id} claims approver {approval.approver!r} but is signed by "
            f"{key.owner!r}"
        )
    return None


@dataclass(frozen=True, slots=True)
class Admission:
    """The executor's checks: signature -> policy -> approval."""

    policy: Policy
    verifier: Verifier
    store: Store

    async def refusal(self, intent: Intent, now: float) -> str | None:
        """Why this intent must not run (the dead-letter reason), or None."""
        from farmhand.signing import verify

        try:
            verify(intent, self.verifier, role="coordinator")
        except FarmhandError as exc:
            return f"signature check failed: {exc}"
        try:
            self.policy.check(intent)
        except Forbidden as exc:
            return f"policy check failed: {exc}"
        rule = self.policy.approval_rule(intent)
        if rule is None:
            return None
        approvals = await self.store.approvals(intent.id)
        approvers: set[str] = set()
        problems: list[str] = []
        for approval in approvals:
            if approval.decision is not Decision.APPROVE:
                continue
            problem = approval_problem(approval, intent, rule, self.verifier, now)
            if problem is None:
                approvers.add(approval.approver)
            else:
                problems.append(problem)
        if len(approvers) >= rule.required:
            return None
        detail = "; ".join(problems) if problems else "no approvals recorded"
        return f"approval check failed: {len(approvers)} valid of {rule.required} needed ({detail})"
