"""``email.send``: one message per intent over SMTP (plain, STARTTLS or implicit TLS, AUTH).

The Message-ID is derived from the idempotency key (``<sha256(key)[:32]@farmhand.<domain of
from>>``), so every attempt of an intent carries the same one and a copy found in a mailbox
is recognisably this intent's.

SMTP has no idempotency: a message the server accepted is delivered again if sent again, so
the connector is never idempotent. Outcomes:

* 250 after DATA: succeeded; the receipt's external id is the Message-ID and its detail the
  accepted (and any refused) recipients;
* every recipient refused, or a 5xx reply: permanent failure (4xx among the refusals:
  retryable); a 4xx reply, a refused connection or a timeout before DATA: retryable;
* the connection lost or timed out after DATA was sent, before the final reply: uncertain,
  since the server may have accepted the message.

Reconcile searches an IMAP folder (``[accounts.<name>.connector.imap]``, folder "Sent" by
default) for the Message-ID: found is a success; not found stays uncertain (a missing copy
proves nothing: the server may not file one, or not yet); without IMAP the outcome stays
unknown for a human to resolve.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import re
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.policy import default as default_policy
from email.utils import format_datetime
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from farmhand.config import AccountConfig
from farmhand.connectors.base import (
    Call,
    Connector,
    Failed,
    Reconciled,
    Result,
    Succeeded,
    Uncertain,
    parse,
    settings_where,
)
from farmhand.contracts import Attempt
from farmhand.errors import InvalidInput

if TYPE_CHECKING:
    import aiosmtplib

#: envelope recipients per message (to + cc + bcc)
MAX_RECIPIENTS = 100
#: longest server reply kept in an error (after redaction)
_REPLY_EXCERPT = 300
#: seconds a QUIT may take once the outcome is known
_QUIT_TIMEOUT = 2.0
_HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,76}$")
#: headers farmhand writes itself; a payload setting one would contradict the envelope or
#: the Message-ID that makes resends recognisable
_RESERVED_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "sender",
        "return-path",
    }
)


def _no_line_breaks(value: str) -> str:
    if "\r" in value or "\n" in value or "\0" in value:
        raise ValueError("must not contain line breaks or NUL")
    return value


def parse_address(value: str) -> Address:
    """One mailbox (``alice@example.org`` or ``Alice <alice@example.org>``), strictly parsed."""
    _no_line_breaks(value)
    header = default_policy.header_factory("to", value)
    addresses: tuple[Address, ...] = getattr(header, "addresses", ())
    if header.defects or len(addresses) != 1:
        raise ValueError(f"{value!r} is not one valid email address")
    address: Address = addresses[0]
    if not address.username or "." not in address.domain:
        raise ValueError(f"{value!r} needs a local part and a fully qualified domain")
    if not address.addr_spec.isascii():
        raise ValueError(
            f"{value!r}: internationalised addresses (SMTPUTF8) are not supported; use the "
            "ASCII (punycode) form"
        )
    return address


def _address(value: str) -> str:
    parse_address(value)
    return value


EmailAddress = Annotated[str, AfterValidator(_address)]
HeaderText = Annotated[str, AfterValidator(_no_line_breaks)]


class EmailPayload(BaseModel):
    """The payload of an ``email.send`` intent."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    sender: EmailAddress = Field(alias="from", description="The From mailbox.")
    to: list[EmailAddress] = Field(default_factory=list)
    cc: list[EmailAddress] = Field(default_factory=list)
    bcc: list[EmailAddress] = Field(
        default_factory=list, description="Envelope-only recipients (no header is written)."
    )
    reply_to: list[EmailAddress] = Field(default_factory=list)
    subject: HeaderText = Field(max_length=998)
    text: str = Field(description="The plain-text body.")
    html: str | None = Field(default=None, description="An HTML alternative to the text body.")
    headers: dict[str, HeaderText] = Field(
        default_factory=dict,
        description="Extra headers such as In-Reply-To or References; the ones farmhand "
        "writes (From, To, Message-ID, ...) are refused.",
    )

    def recipients(self) -> list[str]:
        """The envelope recipients (to, cc, bcc), each once, as addr-specs."""
        seen: dict[str, str] = {}
        for value in (*self.to, *self.cc, *self.bcc):
            spec = parse_address(value).addr_spec
            seen.setdefault(spec.lower(), spec)
        return list(seen.values())


class ImapSettings(BaseModel):
    """``[accounts.<name>.connector.imap]``: where reconcile looks for sent messages."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    security: Literal["tls", "starttls", "plain"] = "tls"
    #: default: the SMTP username
    username: str | None = None
    folder: str = Field(default="Sent", min_length=1)


class EmailSettings(BaseModel):
    """``[accounts.<name>.connector]`` for ``email.send``; the password is the account's
    secret."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    security: Literal["starttls", "tls", "plain"] = "starttls"
    username: str | None = None
    #: a PEM file of the CAs to trust instead of the system's (a private or self-signed CA)
    ca_file: str | None = None
    #: the name sent in EHLO (default: this host's FQDN)
    helo: str | None = None
    #: From mailboxes this account may send as ("@example.org" allows a whole domain);
    #: empty allows any
    senders: list[str] = Field(default_factory=list)
    imap: ImapSettings | None = None

    @classmethod
    def of(cls, account: AccountConfig) -> EmailSettings:
        """The account's settings, validated (raises InvalidInput naming the setting)."""
        where = settings_where(account, "email.send")
        if not account.connector:
            raise InvalidInput(
                f"account {account.name!r} has no {where}: set at least host (and username; "
                "the password is the account's secret)"
            )
        settings = parse(cls, account.connector, where)
        for security, host, user in settings._logins():
            if user and security == "plain" and not _loopback(host):
                raise InvalidInput(
                    f"{where}: logging in as {user!r} to {host} without TLS would send the "
                    "password in clear; use security = 'starttls' or 'tls'"
                )
        return settings

    def _logins(self) -> list[tuple[str, str, str | None]]:
        found: list[tuple[str, str, str | None]] = [(self.security, self.host, self.username)]
        if self.imap is not None:
            found.append((self.imap.security, self.imap.host, self.imap_username))
        return found

    @property
    def imap_username(self) -> str | None:
        """The IMAP login (the SMTP username unless set)."""
        if self.imap is None:
            return None
        return self.imap.username or self.username

    def tls_context(self) -> ssl.SSLContext:
        """A verifying context: the system's CAs, or only ``ca_file``'s."""
        return ssl.create_default_context(cafile=self.ca_file)

    def allows_sender(self, address: Address) -> bool:
        """Whether this account may send as ``address``."""
        if not self.senders:
            return True
        spec = address.addr_spec.lower()
        return any(
            spec == allowed.lower() or (allowed.startswith("@") and spec.endswith(allowed.lower()))
            for allowed in self.senders
        )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def message_id(key: str, sender: str) -> str:
    """The Message-ID of every attempt of the intent with idempotency key ``key``."""
    domain = parse_address(sender).domain.lower()
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
    return f"<{digest}@farmhand.{domain}>"


def build_message(payload: EmailPayload, key: str, now: datetime | None = None) -> EmailMessage:
    """The message for ``payload``: no Bcc header, the Message-ID derived from ``key``."""
    message = EmailMessage(policy=SMTP_POLICY)
    message["From"] = payload.sender
    if payload.to:
        message["To"] = ", ".join(payload.to)
    if payload.cc:
        message["Cc"] = ", ".join(payload.cc)
    if payload.reply_to:
        message["Reply-To"] = ", ".join(payload.reply_to)
    message["Subject"] = payload.subject
    message["Date"] = format_datetime(now or datetime.now(UTC))
    message["Message-ID"] = message_id(key, payload.sender)
    for name, value in payload.headers.items():
        message[name] = value
    message.set_content(payload.text)
    if payload.html is not None:
        message.add_alternative(payload.html, subtype="html")
    return message


def _redactor(call: Call) -> Callable[[str], str]:
    if call.secret is None:
        return str
    from farmhand.redact import Redactor

    return Redactor([(call.secret.name, call.secret.reveal())]).text


def _reply(exc: aiosmtplib.SMTPResponseException, redact: Callable[[str], str]) -> str:
    # redacted before it is cut: a cut through an echoed credential would hide it from the
    # executor's redactor
    return f"{exc.code} {redact(exc.message)[:_REPLY_EXCERPT]}"


class EmailConnector(Connector):
    """SMTP connector (aiosmtplib), one connection per attempt."""

    kind: ClassVar[str] = "email.send"
    payload_model: ClassVar[type[BaseModel]] = EmailPayload

    def validate(self, payload: dict[str, Any], key: str) -> None:
        parsed = self._payload(payload)
        recipients = parsed.recipients()
        if not recipients:
            raise InvalidInput("email.send payload: needs at least one of to, cc, bcc")
        if len(recipients) > MAX_RECIPIENTS:
            raise InvalidInput(
                f"email.send payload: {len(recipients)} recipients; at most "
                f"{MAX_RECIPIENTS} per message"
            )
        for name in parsed.headers:
            if not _HEADER_NAME.match(name):
                raise InvalidInput(f"email.send payload: headers: {name!r} is not a header name")
            if name.lower() in _RESERVED_HEADERS or name.lower().startswith("content-"):
                raise InvalidInput(
                    f"email.send payload: headers: {name} is written by farmhand; use the "
                    "payload's own fields"
                )

    def validate_for(self, payload: dict[str, Any], account: AccountConfig) -> None:
        settings = EmailSettings.of(account)
        sender = parse_address(self._payload(payload).sender)
        if not settings.allows_sender(sender):
            raise InvalidInput(
                f"email.send: account {account.name!r} may not send as {sender.addr_spec}; "
                f"its senders are {', '.join(settings.senders)}"
            )

    @staticmethod
    def _payload(payload: dict[str, Any]) -> EmailPayload:
        return parse(EmailPayload, payload, "email.send payload")

    def idempotent(self, account: AccountConfig) -> bool:
        return False

    async def execute(self, call: Call) -> Result:
        try:
            self.validate(call.intent.payload, call.intent.key)
            self.validate_for(call.intent.payload, call.account)
        except InvalidInput as exc:
            return Failed(error=str(exc), retryable=False)
        payload = EmailPayload.model_validate(call.intent.payload)
        settings = EmailSettings.of(call.account)
        if settings.username and call.secret is None:
            return Failed(
                error=f"account {call.account.name!r} logs in as {settings.username!r} but "
                "names no secret for the password",
                retryable=False,
            )
        message = build_message(payload, call.intent.key)
        sender = parse_address(payload.sender).addr_spec
        return await _Delivery(settings, call, message, sender, payload.recipients()).run()

    async def reconcile(self, call: Call, attempt: Attempt) -> Reconciled:
        try:
            payload = EmailPayload.model_validate(call.intent.payload)
            settings = EmailSettings.of(call.account)
        except (ValidationError, InvalidInput):
            return await super().reconcile(call, attempt)
        if settings.imap is None:
            return Uncertain(
                f"attempt {attempt.attempt} by {attempt.executor} was interrupted while "
                f"sending; account {call.account.name!r} has no IMAP settings to look for "
                f"Message-ID {message_id(call.intent.key, payload.sender)}: check the "
                "mailbox, then run farmhand resolve"
            )
        mid = message_id(call.intent.key, payload.sender)
        redact = _redactor(call)
        try:
            found = await asyncio.to_thread(_imap_search, settings, call, mid)
        except Exception as exc:  # imaplib raises its own errors, OSError and ssl errors
            return Uncertain(
                f"cannot look for Message-ID {mid} over IMAP at {settings.imap.host}: "
                f"{type(exc).__name__}: {redact(str(exc))[:_REPLY_EXCERPT]}"
            )
        if found:
            return Succeeded(external_id=mid, detail={"found_in": settings.imap.folder})
        return Uncertain(
            f"attempt {attempt.attempt} by {attempt.executor} was interrupted while sending and "
            f"Message-ID {mid} is not in IMAP folder {settings.imap.folder!r}: the server may "
            "not file sent copies (or not yet); check, then run farmhand resolve"
        )


class _Delivery:
    """One SMTP conversation, tracking how far it got (which decides the outcome)."""

    def __init__(
        self,
        settings: EmailSettings,
        call: Call,
        message: EmailMessage,
        sender: str,
        recipients: list[str],
    ) -> None:
        self.settings = settings
        self.call = call
        self.message = message
        self.sender = sender
        self.recipients = recipients
        self.redact = _redactor(call)
        #: "connect" -> "auth" -> "envelope" -> "data" (DATA sent: the server may accept)
        self.phase = "connect"

    def _where(self) -> str:
        port = f":{self.settings.port}" if self.settings.port else ""
        return f"{self.settings.host}{port}"

    async def run(self) -> Result:
        import aiosmtplib

        settings = self.settings
        context = None
        if settings.security != "plain":
            try:
                context = settings.tls_context()
            except (OSError, ssl.SSLError) as exc:
                return Failed(
                    error=f"cannot load ca_file {settings.ca_file}: {exc}", retryable=False
                )
        smtp = aiosmtplib.SMTP(
            hostname=settings.host,
            port=settings.port,
            use_tls=settings.security == "tls",
            start_tls=settings.security == "starttls",
            tls_context=context,
            local_hostname=settings.helo,
            timeout=self.call.timeout,
        )
        try:
            # our own deadline, inside the executor's: a timeout then says how far it got
            async with asyncio.timeout(self.call.timeout * 0.9):
                return await self._converse(smtp)
        except TimeoutError:
            return self._lost(f"timed out after {self.call.timeout * 0.9:.1f}s")
        except aiosmtplib.SMTPResponseException as exc:
            await _quit(smtp)  # the server is still talking: leave politely
            return self._refused(exc)
        except ssl.SSLCertVerificationError as exc:
            return Failed(
                error=f"TLS certificate of {self._where()} not trusted: {exc.verify_message}; "
                "set ca_file in the account's connector settings if it uses a private CA",
                retryable=False,
            )
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPConnectError, OSError) as exc:
            return self._lost(f"{type(exc).__name__}: {self.redact(str(exc))}")
        except aiosmtplib.SMTPException as exc:
            if self.phase == "data":
                return self._lost(f"{type(exc).__name__}: {self.redact(str(exc))}")
            # what is left is the server lacking what the settings ask for (STARTTLS, AUTH)
            return Failed(
                error=f"SMTP {self._where()}: {self.redact(str(exc))[:_REPLY_EXCERPT]}",
                retryable=False,
            )
        finally:
            _abort(smtp.transport)
            smtp.close()

    async def _converse(self, smtp: aiosmtplib.SMTP) -> Result:
        import aiosmtplib

        await smtp.connect()
        if self.settings.username:
            self.phase = "auth"
            secret = self.call.secret
            assert secret is not None  # checked by the connector before delivery starts
            await smtp.login(self.settings.username, secret.reveal())
        self.phase = "envelope"
        await smtp.mail(self.sender)
        accepted: list[str] = []
        refused: dict[str, str] = {}
        for recipient in self.recipients:
            try:
                await smtp.rcpt(recipient)
            except aiosmtplib.SMTPRecipientRefused as exc:
                refused[recipient] = _reply(exc, self.redact)
            else:
                accepted.append(recipient)
        if not accepted:
            await _quit(smtp)
            temporary = any(reply.startswith("4") for reply in refused.values())
            listed = "; ".join(f"{r}: {reply}" for r, reply in refused.items())
            return Failed(
                error=f"every recipient refused by {self._where()}: {listed}", retryable=temporary
            )
        self.phase = "data"
        response = await smtp.data(self.message.as_bytes())
        self.phase = "done"
        await _quit(smtp)
        detail: dict[str, Any] = {
            "accepted": accepted,
            "reply": f"{response.code} {self.redact(response.message)[:_REPLY_EXCERPT]}",
        }
        if refused:
            detail["refused"] = refused
        return Succeeded(external_id=str(self.message["Message-ID"]), detail=detail)

    def _lost(self, why: str) -> Result:
        if self.phase in ("data", "done"):
            return Uncertain(
                error=f"connection to {self._where()} lost after the message was sent, before "
                f"the server confirmed it ({why}); it may have been accepted: Message-ID "
                f"{self.message['Message-ID']}"
            )
        return Failed(error=f"SMTP {self._where()} during {self.phase}: {why}", retryable=True)

    def _refused(self, exc: aiosmtplib.SMTPResponseException) -> Result:
        reply = _reply(exc, self.redact)
        error = f"SMTP {self._where()} refused during {self.phase}: {reply}"
        if 400 <= exc.code < 500:
            return Failed(error=error, retryable=True)
        if 500 <= exc.code < 600:
            return Failed(error=error, retryable=False)
        # not a reply code (aiosmtplib uses -1 for a garbled reply): the server may have
        # taken the message if DATA was already sent
        return self._lost(reply)


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    """QUIT, then drop the connection whatever the answer."""
    import aiosmtplib

    transport = smtp.transport
    try:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            await asyncio.wait_for(smtp.quit(), _QUIT_TIMEOUT)
    finally:
        _abort(transport)


def _abort(transport: asyncio.BaseTransport | None) -> None:
    # abort, not close: closing TLS waits for the peer's close_notify, which a server that
    # already hung up (or never will) leaves pending with the socket open
    if isinstance(transport, asyncio.WriteTransport):
        transport.abort()


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _imap_search(settings: EmailSettings, call: Call, mid: str) -> list[str]:
    """Message numbers in the IMAP folder whose Message-ID header is ``mid`` (blocking)."""
    import imaplib

    imap_settings = settings.imap
    assert imap_settings is not None
    timeout = call.timeout * 0.9
    client: imaplib.IMAP4
    if imap_settings.security == "tls":
        client = imaplib.IMAP4_SSL(
            imap_settings.host,
            imap_settings.port or 993,
            ssl_context=settings.tls_context(),
            timeout=timeout,
        )
    else:
        client = imaplib.IMAP4(imap_settings.host, imap_settings.port or 143, timeout=timeout)
        if imap_settings.security == "starttls":
            client.starttls(ssl_context=settings.tls_context())
    try:
        username = settings.imap_username
        if username:
            if call.secret is None:
                raise InvalidInput(f"IMAP login as {username!r} needs the account's secret")
            client.login(username, call.secret.reveal())
        status, _ = client.select(_quoted(imap_settings.folder), readonly=True)
        if status != "OK":
            raise InvalidInput(f"IMAP folder {imap_settings.folder!r} cannot be opened")
        status, data = client.search(None, "HEADER", "Message-ID", _quoted(mid))
        if status != "OK":
            raise InvalidInput(f"IMAP search in {imap_settings.folder!r} failed: {data!r}")
        return _numbers(data)
    finally:
        with contextlib.suppress(Exception):
            client.logout()


def _numbers(data: list[Any]) -> list[str]:
    found: list[str] = []
    for chunk in data:
        if isinstance(chunk, bytes):
            found += chunk.decode("ascii", "replace").split()
    return found
