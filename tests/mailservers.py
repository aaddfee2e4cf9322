"""Real mail servers on loopback for the ``email.send`` tests.

* :func:`self_signed` makes a certificate for ``localhost``/``127.0.0.1`` with the openssl
  command (clients trust it through a CA file, never by turning verification off);
* :class:`SmtpServer` is aiosmtpd (a real SMTP server) with AUTH, STARTTLS or implicit TLS,
  whose replies a test can script by recipient or per DATA, and which can hold its reply to
  DATA after receiving the message (a client that dies there has sent it);
* :class:`Dovecot` is Debian's dovecot IMAP server in a temporary directory, one user, with a
  "Sent" folder the SMTP server files accepted messages into, as many providers do.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

USER = "bot@example.org"
PASSWORD = "smtp-pass-5d1e8c"


def self_signed(directory: Path) -> tuple[Path, Path]:
    """``(cert, key)`` PEM files for localhost and 127.0.0.1 (raises if openssl is missing)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subject = ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    key_type = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    subprocess.run(
        ["openssl", "req", "-x509", *key_type, "-keyout", str(key), "-out", str(cert), *subject],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@dataclass
class Received:
    """One message the server accepted the DATA of."""

    sender: str
    recipients: list[str]
    data: bytes
    login: str | None

    @property
    def message(self) -> Message:
        return message_from_bytes(self.data)


@dataclass
class _Script:
    #: replies to DATA, used up one per DATA (then 250)
    data_replies: list[str] = field(default_factory=list)
    #: recipient local part -> replies to RCPT, used up one per RCPT (the last one stays)
    rcpt_replies: dict[str, list[str]] = field(default_factory=dict)
    #: hold the reply to DATA, after recording the message, until released
    hold_data: bool = False


class _Handler:
    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    async def handle_RCPT(
        self, _server: SMTP, _session: Session, envelope: Envelope, address: str, _options: Any
    ) -> str:
        local = address.split("@", 1)[0]
        with self.server.lock:
            replies = self.server.script.rcpt_replies.get(local)
            reply = (replies.pop(0) if len(replies) > 1 else replies[0]) if replies else None
        if reply is not None and not reply.startswith("250"):
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, _server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.server.lock:
            script = self.server.script
            reply = script.data_replies.pop(0) if script.data_replies else None
        if reply is not None:
            return reply
        login = session.auth_data.login.decode() if session.auth_data else None
        received = Received(
            sender=str(envelope.mail_from),
            recipients=list(envelope.rcpt_tos),
            data=bytes(envelope.original_content or b""),
            login=login,
        )
        with self.server.lock:
            self.server.received.append(received)
            number = len(self.server.received)
            self.server.changed.notify_all()
        if self.server.on_accept is not None:
            await asyncio.to_thread(self.server.on_accept, received)
        if script.hold_data:
            await asyncio.to_thread(self.server.release.wait, 60)
        return f"250 2.0.0 OK queued as {number}"


class _Controller(Controller):
    """aiosmtpd's controller, closing every open connection when it stops (aiosmtpd only
    cancels their tasks, leaving sockets for the garbage collector to complain about)."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.sessions: list[SMTP] = []

    def factory(self) -> SMTP:
        smtp = super().factory()
        self.sessions.append(smtp)
        return smtp

    def stop(self, no_assert: bool = False) -> None:
        async def close_all() -> None:
            for smtp in self.sessions:
                if smtp.transport is not None:
                    smtp.transport.abort()
            await asyncio.sleep(0.01)

        if self._thread is not None:
            asyncio.run_coroutine_threadsafe(close_all(), self.loop).result(10)
        super().stop(no_assert)


class SmtpServer:
    """aiosmtpd on 127.0.0.1 in a thread: ``security`` is "starttls", "tls" or "plain"."""

    def __init__(
        self,
        security: str,
        cert: tuple[Path, Path] | None = None,
        on_accept: Callable[[Received], None] | None = None,
    ) -> None:
        self.security = security
        self.port = free_port()
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.script = _Script()
        self.release = threading.Event()
        self.on_accept = on_accept
        self.logins: list[str] = []
        context = None
        if cert is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(cert[0]), str(cert[1]))
        kwargs: dict[str, Any] = {
            "hostname": "127.0.0.1",
            "port": self.port,
            "authenticator": self._authenticate,
        }
        if security == "starttls":
            kwargs.update(tls_context=context, require_starttls=True, auth_require_tls=True)
        elif security == "tls":
            # AUTH is offered at once: the whole connection is TLS
            kwargs.update(ssl_context=context, auth_require_tls=False)
        else:
            kwargs.update(authenticator=None)
        self.controller = _Controller(_Handler(self), **kwargs)

    def _authenticate(
        self, _server: SMTP, _session: Session, _envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        ok = data.login.decode() == USER and data.password.decode() == PASSWORD
        if ok:
            with self.lock:
                self.logins.append(mechanism)
        # handled=False: aiosmtpd sends the 535 itself
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    def start(self) -> SmtpServer:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.controller.stop()

    def messages(self) -> list[Received]:
        with self.lock:
            return list(self.received)

    def wait_for(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` messages were received."""
        with self.changed:
            return self.changed.wait_for(lambda: len(self.received) >= count, timeout)

    def reply_to_data(self, *replies: str) -> None:
        """Answer the next DATA commands with these replies (the message is not taken)."""
        with self.lock:
            self.script.data_replies.extend(replies)

    def reply_to_rcpt(self, local_part: str, *replies: str) -> None:
        """Answer RCPT for ``local_part@...`` with these replies in turn (the last repeats)."""
        with self.lock:
            self.script.rcpt_replies[local_part] = list(replies)

    def hold_data(self) -> None:
        """Record each message, then wait for :attr:`release` before confirming it."""
        with self.lock:
            self.script.hold_data = True


class DovecotUnavailable(Exception):
    """Dovecot is not installed or would not start here."""


class Dovecot:
    """A throw-away dovecot IMAP server on 127.0.0.1 with one user (``USER``/``PASSWORD``)."""

    def __init__(self, root: Path, cert: tuple[Path, Path]) -> None:
        binary = shutil.which("dovecot") or "/usr/sbin/dovecot"
        if not os.access(binary, os.X_OK):
            raise DovecotUnavailable("dovecot is not installed (Debian: dovecot-imapd)")
        self.binary = binary
        self.root = root
        self.port = free_port()
        self.config = root / "dovecot.conf"
        me = pwd.getpwuid(os.getuid())
        login_user, internal_user, internal_group = me.pw_name, me.pw_name, _group(me.pw_gid)
        mail_uid, mail_gid = me.pw_uid, me.pw_gid
        if os.getuid() == 0:
            # dovecot refuses to run its login processes as root: use the package's users,
            # which must reach base_dir (the mail itself stays root's)
            try:
                login_user = pwd.getpwnam("dovenull").pw_name
                internal_user = pwd.getpwnam("dovecot").pw_name
                internal_group = _group(pwd.getpwnam("dovecot").pw_gid)
                # nor will it store mail as root
                mail_uid, mail_gid = pwd.getpwnam("dovecot")[2:4]
            except KeyError as exc:
                raise DovecotUnavailable(f"dovecot's system users are missing: {exc}") from None
            root.mkdir(parents=True, exist_ok=True)
            root.chmod(0o755)
        for name in ("run", "state", "mail"):
            (root / name).mkdir(parents=True, exist_ok=True)
        os.chown(root / "mail", mail_uid, mail_gid)
        (root / "passwd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}::::::\n")
        self.config.write_text(
            f"""
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = yes
ssl_cert = <{cert[0]}
ssl_key = <{cert[1]}
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = {internal_user}
default_internal_group = {internal_group}
default_login_user = {login_user}
first_valid_uid = {mail_uid}
first_valid_gid = {mail_gid}
mail_location = maildir:{root}/mail/%u
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={mail_uid} gid={mail_gid} home={root}/mail/%u
}}
namespace inbox {{
  inbox = yes
  mailbox Sent {{
    auto = create
    special_use = \\Sent
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
service imap-login {{
  chroot =
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0600
  }}
  unix_listener stats-writer {{
    mode = 0600
  }}
}}
"""
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Dovecot:
        self.process = subprocess.Popen(
            [self.binary, "-F", "-c", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DovecotUnavailable(f"dovecot exited: {self._log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return self
            time.sleep(0.05)
        self.stop()
        raise DovecotUnavailable(f"dovecot did not listen within 15s: {self._log()}")

    def _log(self) -> str:
        text = ""
        if self.process is not None and self.process.stderr is not None:
            with contextlib.suppress(OSError, ValueError):
                text = self.process.stderr.read1(8192).decode(errors="replace")  # type: ignore[attr-defined]
        log = self.root / "dovecot.log"
        if log.exists():
            text += log.read_text(errors="replace")[-4000:]
        return text

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(15)
        if self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def connect(self, cafile: Path) -> imaplib.IMAP4:
        """A logged-in client (STARTTLS, verified against ``cafile``)."""
        client = imaplib.IMAP4("127.0.0.1", self.port, timeout=10)
        client.starttls(ssl_context=ssl.create_default_context(cafile=str(cafile)))
        client.login(USER, PASSWORD)
        return client

    def append(self, folder: str, data: bytes, cafile: Path) -> None:
        """File a copy of a message in ``folder``."""
        client = self.connect(cafile)
        try:
            status, detail = client.append(folder, "(\\Seen)", None, data)
            assert status == "OK", detail
        finally:
            client.logout()


def _group(gid: int) -> str:
    import grp

    return grp.getgrgid(gid).gr_name
