"""``command.run``: an allow-listed host command per intent, such as a deployment.

The account's connector settings list every command it may run: an entry names an absolute
binary and a pattern for each argument (a literal, a path that must resolve inside a
directory, a regular expression or a choice). The payload picks an entry by name and gives
the arguments; anything that does not match is refused at submit (when the submitting host
configures the account) and again by the executor, which dead-letters it without running
anything.

The command runs without a shell, in its own session (so its whole process group can be
killed), with stdin closed, an explicit working directory and an explicit environment: a
fixed system ``PATH`` and ``LANG``/``LC_ALL=C.UTF-8`` (so that a command finds the tools it
calls and prints predictably, never through a path the executor's user happened to have),
plus what the settings add. The account's secret can be handed to the command in a variable
named by ``secret_env``; nothing else of the executor's environment is passed on.

Outcomes: exit 0 succeeds, with the last ``output_limit`` bytes of stdout and stderr in the
receipt's detail; another exit code fails permanently unless the entry lists it as
retryable; a command still running at its timeout is killed (SIGTERM to its process group,
SIGKILL after ``kill_grace``) and is *uncertain* unless its entry is ``idempotent``, when it
is retried. Output is redacted of the account's secret here, and of every secret the
executor holds before the receipt is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from farmhand.config import AccountConfig
from farmhand.connectors.base import (
    Absent,
    Call,
    Connector,
    Failed,
    Reconciled,
    Result,
    Succeeded,
    Uncertain,
    first_error,
    parse,
    settings_where,
)
from farmhand.contracts import Attempt
from farmhand.errors import InvalidInput

#: a fixed PATH of system directories: commands may call other tools, but never through a
#: directory the executor's own environment put first
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BASE_ENV = {"PATH": BASE_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
#: the bytes kept beyond ``output_limit`` so that a secret straddling the cut is still
#: recognised (and redacted) before the cut
_REDACT_MARGIN = 4096
_READ_CHUNK = 64 * 1024
#: seconds the output pipes may stay open after the command exited (a child it left behind
#: holds them) before the rest of its process group is killed
_PIPE_GRACE = 1.0
#: seconds between looks at whether the command exited
_EXIT_POLL = 0.02
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _absolute(value: str, what: str) -> str:
    if not value.startswith("/") or "\0" in value:
        raise ValueError(f"{what} must be an absolute path")
    return os.path.normpath(value)


class ArgPattern(BaseModel):
    """A placeholder for one argument: exactly one of ``path_under``, ``regex``, ``one_of``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: the argument is a path that, symlinks resolved, lies inside this directory; the
    #: resolved path is what the command receives
    path_under: str | None = None
    #: the whole argument matches this regular expression
    regex: str | None = None
    #: the argument is one of these strings
    one_of: list[str] | None = None

    @field_validator("path_under")
    @classmethod
    def _dir(cls, value: str | None) -> str | None:
        return None if value is None else _absolute(value, "path_under")

    @field_validator("regex")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> ArgPattern:
        chosen = [f for f in ("path_under", "regex", "one_of") if getattr(self, f) is not None]
        if len(chosen) != 1:
            raise ValueError("an argument pattern has exactly one of path_under, regex, one_of")
        return self

    def describe(self) -> str:
        """How the pattern reads in an error message."""
        if self.path_under is not None:
            return f"<path under {self.path_under}>"
        if self.regex is not None:
            return f"<matching {self.regex}>"
        return f"<one of {'|'.join(self.one_of or [])}>"

    def match(self, value: str) -> str:
        """The argument to pass for ``value`` (raises ValueError saying why it does not fit)."""
        if self.path_under is not None:
            if not value.startswith("/"):
                raise ValueError(f"{value!r} is not an absolute path under {self.path_under}")
            resolved = os.path.realpath(value)
            root = os.path.realpath(self.path_under)
            if resolved == root or os.path.commonpath([resolved, root]) != root:
                raise ValueError(f"{value!r} does not resolve inside {self.path_under}")
            return resolved
        if self.regex is not None:
            if re.fullmatch(self.regex, value) is None:
                raise ValueError(f"{value!r} does not match {self.regex}")
            return value
        if value not in (self.one_of or []):
            raise ValueError(f"{value!r} is not one of {', '.join(self.one_of or [])}")
        return value


class CommandEntry(BaseModel):
    """One allowed command: ``[[accounts.<name>.connector.commands]]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    path: str
    args: list[str | ArgPattern] = Field(default_factory=list)
    #: running it again after an interrupted or timed-out run cannot duplicate its effect
    idempotent: bool = False
    timeout: float | None = Field(default=None, gt=0)
    working_dir: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    #: exit codes that mean "try again later" (any other non-zero code is permanent)
    retryable_exit_codes: list[int] = Field(default_factory=list)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return _absolute(value, "path")

    @field_validator("args", mode="before")
    @classmethod
    def _patterns(cls, value: Any) -> Any:
        # a table is a pattern: validated here so an error names what is wrong with it
        # rather than saying it is not a string
        if not isinstance(value, list):
            return value
        patterns: list[Any] = []
        for number, item in enumerate(value, start=1):
            if not isinstance(item, dict):
                patterns.append(item)
                continue
            try:
                patterns.append(ArgPattern.model_validate(item))
            except ValidationError as exc:
                raise ValueError(f"argument {number}: {first_error(exc)}") from None
        return patterns

    @field_validator("working_dir")
    @classmethod
    def _working_dir(cls, value: str | None) -> str | None:
        return None if value is None else _absolute(value, "working_dir")

    def describe(self) -> str:
        """``name (binary arg <pattern> ...)`` for error messages."""
        shown = [a if isinstance(a, str) else a.describe() for a in self.args]
        return f"{self.name!r} ({' '.join([self.path, *shown])})"

    def argv(self, args: list[str]) -> list[str]:
        """The argv to run for the payload's ``args`` (raises InvalidInput naming the entry)."""
        if len(args) != len(self.args):
            raise InvalidInput(
                f"command.run: entry {self.describe()} takes {len(self.args)} argument(s), "
                f"the payload gives {len(args)}"
            )
        argv = [self.path]
        for number, (value, pattern) in enumerate(zip(args, self.args, strict=True), start=1):
            if isinstance(pattern, str):
                if value != pattern:
                    raise InvalidInput(
                        f"command.run: entry {self.describe()}: argument {number} must be "
                        f"{pattern!r}, got {value!r}"
                    )
                argv.append(value)
                continue
            try:
                argv.append(pattern.match(value))
            except ValueError as exc:
                raise InvalidInput(
                    f"command.run: entry {self.describe()}: argument {number}: {exc}"
                ) from None
        return argv


class CommandSettings(BaseModel):
    """``[accounts.<name>.connector]`` for ``command.run``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    commands: list[CommandEntry] = Field(default_factory=list)
    #: default working directory (an entry's own wins)
    working_dir: str = "/"
    #: default seconds a command may run (an entry's own wins); the executor's call timeout
    #: bounds it in any case
    timeout: float = Field(default=60.0, gt=0)
    #: seconds between SIGTERM and SIGKILL at a timeout
    kill_grace: float = Field(default=2.0, ge=0)
    #: bytes of stdout and of stderr kept (the last ones)
    output_limit: int = Field(default=4096, ge=0, le=64 * 1024)
    #: variables added for every command (an entry's own win)
    env: dict[str, str] = Field(default_factory=dict)
    #: a variable that receives the account's secret, for every command
    secret_env: str | None = None

    @field_validator("working_dir")
    @classmethod
    def _working_dir(cls, value: str) -> str:
        return _absolute(value, "working_dir")

    @classmethod
    def of(cls, account: AccountConfig) -> CommandSettings:
        """The account's settings, validated (raises InvalidInput naming the setting)."""
        where = settings_where(account, "command.run")
        settings = parse(cls, account.connector, where)
        names = [entry.name for entry in settings.commands]
        if len(set(names)) != len(names):
            raise InvalidInput(f"{where}: command names must be unique, got {names}")
        for name in [*settings.env, *(k for e in settings.commands for k in e.env)]:
            if not _ENV_NAME.match(name):
                raise InvalidInput(f"{where}: env: {name!r} is not a variable name")
        if settings.secret_env is not None and not _ENV_NAME.match(settings.secret_env):
            raise InvalidInput(f"{where}: secret_env: {settings.secret_env!r} is not a name")
        return settings

    def entry(self, name: str, account: str) -> CommandEntry:
        """The entry called ``name`` (raises InvalidInput listing the allowed ones)."""
        for entry in self.commands:
            if entry.name == name:
                return entry
        allowed = ", ".join(e.name for e in self.commands) or "none"
        raise InvalidInput(
            f"command.run: {name!r} is not on the allow-list of account {account!r} "
            f"([[accounts.{account}.connector.commands]]); allowed: {allowed}"
        )


class CommandPayload(BaseModel):
    """The payload of a ``command.run`` intent: an allow-list entry and its arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: str = Field(min_length=1, description="The name of an allow-list entry.")
    args: list[str] = Field(
        default_factory=list, description="The arguments after the binary, one per pattern."
    )

    @field_validator("args")
    @classmethod
    def _no_nul(cls, value: list[str]) -> list[str]:
        if any("\0" in arg for arg in value):
            raise ValueError("arguments must not contain NUL")
        return value


def _payload(payload: dict[str, Any]) -> CommandPayload:
    return parse(CommandPayload, payload, "command.run payload")


class _Tail:
    """The last ``keep`` bytes of a stream, and whether anything was dropped."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.dropped = False

    def add(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)
        while self.chunks and self.size - len(self.chunks[0]) >= self.keep:
            self.size -= len(self.chunks.popleft())
            self.dropped = True

    def text(self, limit: int, redact: Callable[[str], str]) -> str:
        data = b"".join(self.chunks)
        if len(data) > self.keep:
            data = data[-self.keep :]
            self.dropped = True
        text = redact(data.decode("utf-8", "replace"))
        if len(text) > limit:
            self.dropped = True
            text = text[-limit:]
        return text


async def _drain(stream: asyncio.StreamReader | None, tail: _Tail) -> None:
    if stream is None:
        return
    while chunk := await stream.read(_READ_CHUNK):
        tail.add(chunk)


async def _exited(process: asyncio.subprocess.Process) -> int:
    """The exit code, as soon as the process exits.

    ``Process.wait()`` also waits for the output pipes to close, which a child the command
    left behind keeps open; the return code is known at exit, so it is polled instead.
    """
    while process.returncode is None:  # noqa: ASYNC110 - no event fires at exit alone
        await asyncio.sleep(_EXIT_POLL)
    return process.returncode


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


class CommandConnector(Connector):
    """Runs allow-listed commands with asyncio subprocesses (no shell)."""

    kind: ClassVar[str] = "command.run"
    payload_model: ClassVar[type[BaseModel]] = CommandPayload

    def validate(self, payload: dict[str, Any], key: str) -> None:
        _payload(payload)

    def validate_for(self, payload: dict[str, Any], account: AccountConfig) -> None:
        self._resolve(payload, account)

    @staticmethod
    def _resolve(
        payload: dict[str, Any], account: AccountConfig
    ) -> tuple[CommandSettings, CommandEntry, list[str]]:
        parsed = _payload(payload)
        settings = CommandSettings.of(account)
        entry = settings.entry(parsed.command, account.name)
        return settings, entry, entry.argv(parsed.args)

    def idempotent(self, account: AccountConfig) -> bool:
        """True only when every command on the account's allow-list is idempotent."""
        try:
            settings = CommandSettings.of(account)
        except InvalidInput:
            return False
        return bool(settings.commands) and all(e.idempotent for e in settings.commands)

    async def execute(self, call: Call) -> Result:
        try:
            settings, entry, argv = self._resolve(call.intent.payload, call.account)
        except InvalidInput as exc:
            return Failed(error=str(exc), retryable=False)
        cwd = entry.working_dir or settings.working_dir
        env = {**BASE_ENV, **settings.env, **entry.env}
        if settings.secret_env is not None:
            if call.secret is None:
                return Failed(
                    error=f"command.run: secret_env {settings.secret_env} is set but account "
                    f"{call.account.name!r} names no secret",
                    retryable=False,
                )
            env[settings.secret_env] = call.secret.reveal()
        # the executor gives up on the call at call.timeout: stop the command (and give it
        # its grace) before that, so it is never left running unobserved
        budget = max(0.1, call.timeout * 0.9 - settings.kill_grace)
        configured = entry.timeout or settings.timeout
        timeout = min(configured, budget)
        cut = ""
        if timeout < configured:
            cut = (
                f" (its timeout of {configured:g}s was cut to fit the executor's call timeout "
                f"of {call.timeout:g}s)"
            )
        redact = _redactor(call)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            return Failed(
                error=f"command.run: entry {entry.describe()} cannot start in {cwd}: "
                f"{exc.strerror or exc}",
                retryable=False,
            )
        return await _Run(process, entry, settings, timeout, redact, cut).wait()

    async def reconcile(self, call: Call, attempt: Attempt) -> Reconciled:
        try:
            _settings, entry, _argv = self._resolve(call.intent.payload, call.account)
        except InvalidInput:
            return await super().reconcile(call, attempt)
        if entry.idempotent:
            return Absent(f"command entry {entry.name!r} is idempotent; running it again")
        return Uncertain(
            f"attempt {attempt.attempt} by {attempt.executor} was interrupted while command "
            f"entry {entry.name!r} ran, and it is not marked idempotent: check what it did, "
            "then run farmhand resolve"
        )


def _redactor(call: Call) -> Callable[[str], str]:
    if call.secret is None:
        return str
    from farmhand.redact import Redactor

    return Redactor([(call.secret.name, call.secret.reveal())]).text


class _Run:
    """One started command: its output, its timeout and the killing of its process group."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        entry: CommandEntry,
        settings: CommandSettings,
        timeout: float,
        redact: Callable[[str], str],
        cut: str = "",
    ) -> None:
        self.process = process
        self.cut = cut
        self.entry = entry
        self.settings = settings
        self.timeout = timeout
        self.redact = redact
        keep = settings.output_limit + _REDACT_MARGIN
        self.stdout = _Tail(keep)
        self.stderr = _Tail(keep)
        # the process leads its own session, so its pid is the process group id
        self.pgid = process.pid
        self.escaped = False

    async def wait(self) -> Result:
        started = time.monotonic()
        readers = asyncio.gather(
            _drain(self.process.stdout, self.stdout), _drain(self.process.stderr, self.stderr)
        )
        timed_out = False
        try:
            try:
                await asyncio.wait_for(_exited(self.process), self.timeout)
            except TimeoutError:
                timed_out = True
                await self._kill()
            try:
                await asyncio.wait_for(asyncio.shield(readers), _PIPE_GRACE)
            except TimeoutError:
                # something it started still holds the pipes: nothing may outlive the call
                await self._kill()
                try:
                    await asyncio.wait_for(readers, _PIPE_GRACE)
                except TimeoutError:
                    # only a process that left the group (setsid) can still hold them
                    self.escaped = True
        except BaseException:
            # cancelled by the executor (shutdown): stop everything at once, then re-raise
            _signal_group(self.pgid, signal.SIGKILL)
            readers.cancel()
            with contextlib.suppress(BaseException):
                await readers
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            raise
        return self._result(timed_out, time.monotonic() - started)

    async def _kill(self) -> None:
        _signal_group(self.pgid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_exited(self.process), self.settings.kill_grace)
        _signal_group(self.pgid, signal.SIGKILL)
        await _exited(self.process)

    def _output(self) -> dict[str, Any]:
        limit = self.settings.output_limit
        out = self.stdout.text(limit, self.redact)
        err = self.stderr.text(limit, self.redact)
        detail: dict[str, Any] = {"stdout": out, "stderr": err}
        cut = [
            name
            for name, tail in (("stdout", self.stdout), ("stderr", self.stderr))
            if tail.dropped
        ]
        if cut:
            detail["truncated"] = cut
        if self.escaped:
            detail["note"] = "a process that left the command's process group kept its output open"
        return detail

    def _result(self, timed_out: bool, seconds: float) -> Result:
        code = self.process.returncode
        output = self._output()
        name = self.entry.name
        if timed_out:
            error = (
                f"command {name!r} still running after {self.timeout:.1f}s{self.cut}; its "
                "process group was killed; it may have done part or all of its work"
                + _excerpt(output)
            )
            if self.entry.idempotent:
                return Failed(error=error, retryable=True)
            return Uncertain(error=error)
        if code == 0:
            return Succeeded(
                detail={
                    "command": name,
                    "exit_code": 0,
                    "seconds": round(seconds, 3),
                    **output,
                }
            )
        how = (
            f"was killed by signal {-code}"
            if code is not None and code < 0
            else (f"exited with {code}")
        )
        error = f"command {name!r} {how}" + _excerpt(output)
        return Failed(error=error, retryable=code in self.entry.retryable_exit_codes)


def _excerpt(output: dict[str, Any]) -> str:
    """The output tails for an error text (a failure's receipt carries no detail)."""
    parts = [f"{name}: {output[name]}" for name in ("stderr", "stdout") if output[name].strip()]
    return ("; " + "; ".join(parts)) if parts else ""
