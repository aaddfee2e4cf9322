"""Executor-side secrets: credentials that only the hands ever hold.

An account names the secret it uses (``[accounts.billing] secret = "BILLING_TOKEN"``); the
value lives only on the executor host, in either of:

* an environment variable ``FARMHAND_SECRET_<NAME>`` (NAME upper-cased, every character
  other than A-Z and 0-9 replaced by ``_``), or
* a TOML file of ``name = "value"`` lines: ``$FARMHAND_SECRETS_FILE`` or
  ``$FARMHAND_HOME/secrets.toml``. It must be readable by its owner only (``chmod 600``),
  and must live neither in a synced or network folder nor in a folder of its own with the
  store (the default layout, everything under ``$FARMHAND_HOME``, is allowed).

The environment wins when both define a name. The executor loads secrets once, at start;
the coordinator (submit, list, status, ...) never reads them. Values travel inside
:class:`Secret`, whose ``repr``/``str``/format show only the name: the value comes out only
through :meth:`Secret.reveal`, right where a connector puts it on the wire.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from farmhand.errors import FarmhandError

if TYPE_CHECKING:
    from farmhand.config import Settings
    from farmhand.redact import Redactor

ENV_PREFIX = "FARMHAND_SECRET_"
FILE_ENV = "FARMHAND_SECRETS_FILE"
FILE_NAME = "secrets.toml"
_NOT_ALNUM = re.compile(r"[^A-Z0-9]")


class SecretsError(FarmhandError):
    """The secrets file cannot be used (permissions, location, syntax). Exit code 1.

    Messages name files and secrets, never values.
    """


class Secret:
    """A secret value that does not show itself: repr, str and format give only its name."""

    __slots__ = ("_name", "_value")

    def __init__(self, name: str, value: str) -> None:
        self._name = name
        self._value = value

    @property
    def name(self) -> str:
        """The secret's name (safe to log)."""
        return self._name

    def reveal(self) -> str:
        """The value. Call it only where the value goes on the wire; never log the result."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self._name!r})"

    def __str__(self) -> str:
        return f"[redacted:{self._name}]"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return self._name == other._name and self._value == other._value

    def __hash__(self) -> int:
        return hash((Secret, self._name))

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled: it must not leave the executor process")


def env_name(name: str) -> str:
    """The environment variable that holds secret ``name``: ``FARMHAND_SECRET_<NAME>``."""
    return ENV_PREFIX + _NOT_ALNUM.sub("_", name.upper())


def file_path(home: Path, environ: Mapping[str, str] | None = None) -> Path:
    """Where the secrets file is looked for: ``$FARMHAND_SECRETS_FILE`` or home/secrets.toml."""
    env = os.environ if environ is None else environ
    named = env.get(FILE_ENV)
    return Path(named).expanduser() if named else home / FILE_NAME


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def location_problem(path: Path, home: Path, store_url: str) -> str | None:
    """Why ``path`` is the wrong place for a secrets file, or None.

    Refused: a synced or network folder (copies and backups multiply the secret), and the
    store's own folder when that is not the farmhand home (a folder shared for the store is
    one more place the file would be copied from), and anywhere under a folder store's root.
    """
    from farmhand.store.paths import unsafe_reason

    reason = unsafe_reason(path)
    if reason:
        return reason
    if store_url.partition(":")[0].lower() == "sqlite":
        from farmhand.store import sqlite_path

        try:
            store_dir = Path(os.path.realpath(sqlite_path(store_url).parent))
        except FarmhandError:
            return None
        real = Path(os.path.realpath(path))
        if store_dir != Path(os.path.realpath(home)) and _inside(real, store_dir):
            return f"it is inside the store's folder {store_dir}"
    if store_url.partition(":")[0].lower() == "folder":
        from farmhand.store.folder import folder_root

        try:
            root = Path(os.path.realpath(folder_root(store_url)))
        except FarmhandError:
            return None
        # all of a folder store is synced to the other machine, even when it is the home
        if _inside(Path(os.path.realpath(path)), root):
            return f"it is inside the shared folder store {root}, which is synced to other machines"
    return None


def mode_problem(path: Path) -> str | None:
    """Why the file's permissions are too open, or None (group/other must have no access)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return f"it has mode {mode:04o}; it must be readable by its owner only"
    return None


def _refuse(path: Path, problem: str, fix: str) -> NoReturn:
    raise SecretsError(f"refusing the secrets file {path}: {problem}; {fix}")


def read_file(path: Path, home: Path, store_url: str) -> dict[str, str]:
    """The secrets in ``path`` (name -> value), after checking its mode and location."""
    import tomllib

    try:
        problem = mode_problem(path)
    except OSError as exc:
        _refuse(path, f"cannot stat it ({exc.strerror})", "check the path and its permissions")
    if problem:
        _refuse(path, problem, f"chmod 600 {path}")
    where = location_problem(path, home, store_url)
    if where:
        _refuse(path, where, "move it to a local folder of its own and set FARMHAND_SECRETS_FILE")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        _refuse(path, f"cannot read it ({exc.strerror})", "check its owner and permissions")
    try:
        # tomllib's messages give line and column, never the text around them
        data: dict[str, Any] = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        _refuse(path, f"it is not valid TOML ({exc})", 'write one name = "value" per line')
    secrets: dict[str, str] = {}
    for name, value in data.items():
        if not isinstance(value, str):
            _refuse(
                path,
                f"{name} is not a string",
                f'write {name} = "value" (a quoted string, not a table or number)',
            )
        if not value:
            _refuse(path, f"{name} is empty", f"give {name} a value or remove it")
        secrets[name] = value
    return secrets


@dataclass(frozen=True, slots=True)
class SecretStore:
    """The secrets this executor holds, by name. Build it with :func:`load`."""

    #: values from FARMHAND_SECRET_* variables, by the variable's suffix (normalised name)
    from_env: Mapping[str, Secret]
    #: values from the secrets file, by the name written in it
    from_file: Mapping[str, Secret]
    #: the secrets file that was read, if any
    file: Path | None = None

    @classmethod
    def empty(cls) -> SecretStore:
        """A store holding nothing."""
        return cls({}, {})

    def get(self, name: str) -> Secret | None:
        """Secret ``name``: the environment first, then the file (exact, then normalised)."""
        normalised = env_name(name).removeprefix(ENV_PREFIX)
        found = self.from_env.get(normalised) or self.from_file.get(name)
        if found is None:
            for written, secret in self.from_file.items():
                if env_name(written) == env_name(name):
                    return Secret(name, secret.reveal())
            return None
        return found if found.name == name else Secret(name, found.reveal())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[Secret]:
        yield from self.from_env.values()
        yield from self.from_file.values()

    def __len__(self) -> int:
        return len(self.from_env) + len(self.from_file)

    def redactor(self, names: Iterable[str] = ()) -> Redactor:
        """A redactor for every value held. ``names`` (e.g. the accounts' secret names) label
        environment values by the name an account uses rather than the variable's suffix."""
        from farmhand.redact import Redactor

        labels = {env_name(n).removeprefix(ENV_PREFIX): n for n in names}
        values: list[tuple[str, str]] = [(s.name, s.reveal()) for s in self.from_file.values()]
        values += [(labels.get(s.name, s.name), s.reveal()) for s in self.from_env.values()]
        return Redactor(values)

    def where(self, name: str) -> str:
        """Where an operator puts secret ``name`` (for hints; never shows a value)."""
        target = self.file if self.file is not None else f"$FARMHAND_HOME/{FILE_NAME}"
        return f"set {env_name(name)} or add {name} to {target} on the executor host"


def from_environment(environ: Mapping[str, str] | None = None) -> dict[str, Secret]:
    """Every non-empty ``FARMHAND_SECRET_*`` variable, by its suffix."""
    env = os.environ if environ is None else environ
    found: dict[str, Secret] = {}
    for variable, value in env.items():
        if variable.startswith(ENV_PREFIX) and len(variable) > len(ENV_PREFIX) and value:
            suffix = variable.removeprefix(ENV_PREFIX)
            found[suffix] = Secret(suffix, value)
    return found


def load(settings: Settings, environ: Mapping[str, str] | None = None) -> SecretStore:
    """Load the executor's secrets once: the environment and the secrets file.

    A file named by ``FARMHAND_SECRETS_FILE`` must exist; the default one is optional. A file
    with loose permissions or in the wrong place is refused (:class:`SecretsError`).
    """
    env = os.environ if environ is None else environ
    path = file_path(settings.home, env)
    from_file: dict[str, Secret] = {}
    used: Path | None = None
    if path.exists():
        values = read_file(path, settings.home, settings.store_url)
        from_file = {name: Secret(name, value) for name, value in values.items()}
        used = path
    elif env.get(FILE_ENV):
        raise SecretsError(
            f"the secrets file {path} named by {FILE_ENV} does not exist; create it (mode 600) "
            f"or unset {FILE_ENV}"
        )
    return SecretStore(from_environment(env), from_file, used)


def missing(settings: Settings, store: SecretStore) -> dict[str, list[str]]:
    """Secret names some account uses but ``store`` lacks -> the accounts that use them."""
    wanted: dict[str, list[str]] = {}
    for account in settings.accounts.values():
        if account.secret and account.secret not in store:
            wanted.setdefault(account.secret, []).append(account.name)
    return wanted
