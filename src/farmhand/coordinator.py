"""The brain's API: submit, cancel, resolve, re-queue and gate. It never performs an effect."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from farmhand.canonical import bytes_hash, canonical_json
from farmhand.clock import Clock, SystemClock
from farmhand.connectors import connector_class
from farmhand.contracts import (
    MAX_PAYLOAD_BYTES,
    Approval,
    Decision,
    GateRule,
    Intent,
    IntentState,
    IntentStatus,
    Outcome,
    Receipt,
    ReceiptSource,
)
from farmhand.contracts.base import utc
from farmhand.errors import (
    ConflictError,
    FarmhandError,
    Forbidden,
    InvalidInput,
    InvalidTransition,
    NotFound,
)
from farmhand.ids import new_id
from farmhand.store.base import Change, IntentQuery, NewIntent, Store

if TYPE_CHECKING:
    from farmhand.config import AccountConfig
    from farmhand.policy import Policy
    from farmhand.signing import Signer

#: Attempts granted to a dead letter re-queued by hand.
REQUEUE_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class SubmitRequest:
    """What a producer asks for. Validated into an :class:`Intent` by :meth:`Coordinator.submit`."""

    kind: str
    key: str
    payload: Any
    account: str = "default"
    agent: str = "local"
    not_before: datetime | None = None
    expires_at: datetime | None = None
    max_attempts: int = 5


@dataclass(frozen=True, slots=True)
class Submitted:
    """The stored intent, and whether this call created it (False: idempotent repeat)."""

    status: IntentStatus
    created: bool


def _pydantic_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "intent"
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}"


class Coordinator:
    """Submits and manages intents on a store, recording who did what and why."""

    def __init__(
        self,
        store: Store,
        clock: Clock | None = None,
        *,
        policy: Policy | None = None,
        signer: Signer | None = None,
        accounts: Mapping[str, AccountConfig] | None = None,
    ) -> None:
        """``policy`` is checked on every submit; ``signer`` (the coordinator's key) signs
        every intent. Executors refuse unsigned intents and re-check the policy.
        ``accounts``: the accounts this host configures; a payload for one of them is also
        checked against its connector settings (executors check it again)."""
        self.store = store
        self.policy = policy
        self.signer = signer
        self.accounts = accounts
        self._clock = clock or SystemClock()

    def build_intent(self, request: SubmitRequest) -> Intent:
        """Validate a request into an intent (raises InvalidInput / UnknownKind)."""
        intent = self.validate(request)
        if self.signer is not None:
            from farmhand.signing import sign

            intent = sign(intent, self.signer)
        return intent

    def build_intents(self, requests: Sequence[SubmitRequest]) -> list[Intent]:
        """Validate several requests into intents signed together with one signature.

        Raises on the first invalid request, like :meth:`build_intent`; to keep the valid
        ones of a mixed lot, :meth:`validate` each and :meth:`sign_intents` the rest.
        """
        return self.sign_intents([self.validate(request) for request in requests])

    def sign_intents(self, intents: Sequence[Intent]) -> list[Intent]:
        """``intents`` signed with one batch signature (unchanged when there is no signer).

        Executors verify the batch's signature once and then only hash each intent's proof.
        """
        if self.signer is None:
            return list(intents)
        from farmhand.signing import sign_many

        return sign_many(intents, self.signer)

    def validate(self, request: SubmitRequest) -> Intent:
        """The unsigned intent of a valid request (raises InvalidInput / UnknownKind /
        Forbidden): payload, connector settings and policy are checked."""
        connector = connector_class(request.kind)()
        if not isinstance(request.payload, dict):
            raise InvalidInput(
                f"payload must be a JSON object, got {type(request.payload).__name__}"
            )
        encoded = canonical_json(request.payload)
        size = len(encoded)
        if size > MAX_PAYLOAD_BYTES:
            raise InvalidInput(
                f"payload is {size} bytes; the limit is {MAX_PAYLOAD_BYTES}: store large "
                "content elsewhere and pass a reference"
            )
        connector.validate(request.payload, request.key)
        if self.accounts is not None and request.account in self.accounts:
            connector.validate_for(request.payload, self.accounts[request.account])
        try:
            intent = Intent(
                id=new_id("in"),
                key=request.key,
                kind=request.kind,
                account=request.account,
                agent=request.agent,
                payload=request.payload,
                payload_hash=bytes_hash(encoded),
                created_at=utc(self._clock.now()),
                not_before=request.not_before,
                expires_at=request.expires_at,
                max_attempts=request.max_attempts,
            )
        except ValidationError as exc:
            raise InvalidInput(_pydantic_message(exc)) from None
        if self.policy is not None:
            self.policy.check(intent)
        return intent

    def _first_state(self, intent: Intent) -> IntentState:
        if self.policy is not None and self.policy.approval_rule(intent) is not None:
            return IntentState.AWAITING_APPROVAL
        return IntentState.PENDING

    async def submit(self, request: SubmitRequest, actor: str | None = None) -> Submitted:
        """Store one intent idempotently (same key + same request returns the existing one)."""
        (result,) = await self.submit_many([self.build_intent(request)], actor)
        if isinstance(result, FarmhandError):
            raise result
        return result

    async def submit_many(
        self, intents: Sequence[Intent], actor: str | None = None
    ) -> list[Submitted | ConflictError]:
        """Store many validated intents in one transaction; conflicts are returned, not raised."""
        items = [NewIntent(i, self._first_state(i), actor or f"agent:{i.agent}") for i in intents]
        stored = await self.store.put_intents(items)
        results: list[Submitted | ConflictError] = []
        for intent, (status, created) in zip(intents, stored, strict=True):
            if created or status.id == intent.id:
                results.append(Submitted(status, True))
            elif (status.payload_hash, status.kind, status.account) == (
                intent.payload_hash,
                intent.kind,
                intent.account,
            ):
                results.append(Submitted(status, False))
            else:
                results.append(
                    ConflictError(
                        f"idempotency key {intent.key!r} is already used by intent {status.id} "
                        f"({status.kind}, account {status.account}, payload {status.payload_hash});"
                        f" this request has {intent.kind}, account {intent.account}, payload "
                        f"{intent.payload_hash}. Use a new key for a different action"
                    )
                )
        return results

    async def status(self, ref: str) -> IntentStatus:
        """The intent with this id or key."""
        found = await self.store.get_intent(ref)
        if found is None:
            raise NotFound(f"no intent with id or key {ref!r}; see farmhand list")
        return found

    async def list_intents(self, query: IntentQuery) -> list[IntentStatus]:
        """Intents matching ``query``, newest first."""
        return await self.store.list_intents(query)

    async def _change(
        self,
        ref: str,
        to_state: IntentState,
        from_states: tuple[IntentState, ...],
        actor: str,
        action: str,
        reason: str | None,
        **extra: Any,
    ) -> IntentStatus:
        current = await self.status(ref)
        if current.state not in from_states:
            raise InvalidTransition(
                f"intent {current.id} is {current.state}; {action} needs it to be "
                + " or ".join(from_states)
            )
        change = Change(
            intent_id=current.id,
            to_state=to_state,
            actor=actor,
            action=action,
            reason=reason,
            from_states=(current.state,),
            **extra,
        )
        (applied,) = await self.store.apply([change])
        if not applied:
            now = await self.status(current.id)
            raise InvalidTransition(
                f"intent {current.id} changed to {now.state} while {action} was being applied; "
                "check farmhand status and try again"
            )
        return await self.status(current.id)

    async def cancel(self, ref: str, actor: str, reason: str | None = None) -> IntentStatus:
        """Withdraw an intent that has not run (pending, awaiting approval or retry-wait)."""
        return await self._change(
            ref,
            IntentState.CANCELLED,
            (IntentState.PENDING, IntentState.AWAITING_APPROVAL, IntentState.RETRY_WAIT),
            actor,
            "cancel",
            reason or "cancelled by request",
        )

    async def resolve(
        self,
        ref: str,
        outcome: str,
        actor: str,
        reason: str | None = None,
        external_id: str | None = None,
        url: str | None = None,
    ) -> IntentStatus:
        """Settle an intent in ``unknown``: ``succeeded``, ``retry`` or ``fail``."""
        current = await self.status(ref)
        if current.state is not IntentState.UNKNOWN:
            raise InvalidTransition(
                f"intent {current.id} is {current.state}; only unknown intents can be resolved"
            )
        now = utc(self._clock.now())
        if outcome == "succeeded":
            receipt = Receipt(
                id=new_id("rc"),
                intent_id=current.id,
                attempt=current.attempts,
                outcome=Outcome.SUCCEEDED,
                external_id=external_id,
                url=url,
                executor=actor,
                fencing_token=current.lease_token,
                source=ReceiptSource.HUMAN,
                finished_at=now,
                detail={"reason": reason} if reason else {},
            )
            return await self._change(
                ref,
                IntentState.SUCCEEDED,
                (IntentState.UNKNOWN,),
                actor,
                "resolve.succeeded",
                reason or "confirmed by hand",
                receipt=receipt,
            )
        if outcome == "retry":
            extra = 1 if current.attempts >= current.max_attempts else 0
            return await self._change(
                ref,
                IntentState.PENDING,
                (IntentState.UNKNOWN,),
                actor,
                "resolve.retry",
                reason or "retry requested by hand",
                extra_attempts=extra,
            )
        if outcome == "fail":
            receipt = Receipt(
                id=new_id("rc"),
                intent_id=current.id,
                attempt=current.attempts,
                outcome=Outcome.FAILED,
                error=reason or "marked failed by hand",
                retryable=False,
                executor=actor,
                fencing_token=current.lease_token,
                source=ReceiptSource.HUMAN,
                finished_at=now,
            )
            return await self._change(
                ref,
                IntentState.DEAD,
                (IntentState.UNKNOWN,),
                actor,
                "resolve.fail",
                reason or "marked failed by hand",
                receipt=receipt,
            )
        raise InvalidInput(f"unknown resolution {outcome!r}; use succeeded, retry or fail")

    async def decide(
        self,
        ref: str,
        decision: Decision,
        signer: Signer,
        reason: str | None = None,
    ) -> IntentStatus:
        """Record an approver's signed decision on an intent awaiting approval.

        The approver is the owner of ``signer``'s key. Enough approvals move the intent to
        pending; one rejection moves it to rejected. Each approval is bound to the intent id,
        its payload hash and the rule's lifetime, and the executor checks all of them again.
        """
        from farmhand.signing import sign

        current = await self.status(ref)
        if current.state is not IntentState.AWAITING_APPROVAL:
            raise InvalidTransition(
                f"intent {current.id} is {current.state}; only intents awaiting approval can "
                "be approved or rejected"
            )
        intent = current.to_intent()
        rule = self.policy.approval_rule(intent) if self.policy is not None else None
        if rule is None:
            raise InvalidTransition(
                f"no approval rule in farmhand.toml covers intent {current.id} any more; "
                "cancel it or restore the rule"
            )
        approver = signer.owner
        if approver not in rule.approvers:
            raise Forbidden(
                f"{approver!r} is not an approver for {intent.kind} on account "
                f"{intent.account}; approvers: {', '.join(rule.approvers)}"
            )
        now = self._clock.now()
        approval = sign(
            Approval(
                id=new_id("ap"),
                intent_id=current.id,
                payload_hash=current.payload_hash,
                approver=approver,
                decision=decision,
                reason=reason,
                created_at=utc(now),
                expires_at=utc(now) + timedelta(seconds=rule.lifetime),
            ),
            signer,
        )
        change: Change | None = None
        if decision is Decision.REJECT:
            change = Change(
                intent_id=current.id,
                to_state=IntentState.REJECTED,
                actor=approver,
                action="reject",
                reason=reason or f"rejected by {approver}",
                from_states=(current.state,),
            )
        else:
            approvers = {
                a.approver
                for a in await self.store.approvals(current.id)
                if a.decision is Decision.APPROVE
                and a.payload_hash == current.payload_hash
                and a.expires_at.timestamp() > now
                and a.approver in rule.approvers
            } | {approver}
            if len(approvers) >= rule.required:
                change = Change(
                    intent_id=current.id,
                    to_state=IntentState.PENDING,
                    actor=approver,
                    action="approve",
                    reason=f"approved by {', '.join(sorted(approvers))}",
                    from_states=(current.state,),
                )
        if not await self.store.put_approval(approval, change):
            raise InvalidTransition(
                f"intent {current.id} changed while the decision was being recorded; check "
                "farmhand status and try again"
            )
        return await self.status(current.id)

    async def requeue(self, ref: str, actor: str, reason: str | None = None) -> IntentStatus:
        """Send a dead letter back to pending with a fresh allowance of attempts."""
        return await self._change(
            ref,
            IntentState.PENDING,
            (IntentState.DEAD,),
            actor,
            "dlq.retry",
            reason or "re-queued from the dead-letter queue",
            extra_attempts=REQUEUE_ATTEMPTS,
        )

    async def set_gate(
        self,
        open_: bool,
        actor: str,
        kind: str | None = None,
        account: str | None = None,
        reason: str | None = None,
    ) -> GateRule:
        """Close (kill switch off) or open a scope: everything, one kind, one account, or both."""
        if kind is not None:
            connector_class(kind)
        rule = GateRule(
            kind=kind,
            account=account,
            open=open_,
            actor=actor,
            reason=reason,
            changed_at=utc(self._clock.now()),
        )
        await self.store.set_gate(rule)
        return rule

    async def gates(self) -> list[GateRule]:
        """Every gate rule set so far (open and closed)."""
        return await self.store.gates()
