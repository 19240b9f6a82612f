"""Who is logged in: the account the upstream opens, not the client's spelling.

popguard's policies, limits, throttles and records are keyed by the
*account*: the name the upstream server ends up opening a mailbox for.  A
client does not say that name; it says a *login name* (USER, APOP, or inside
SASL), and the server maps it to an account by its own rules.  Dovecot, for
example, lowercases names (``auth_username_format = %Lu``), may append a
default realm, and splits ``user*master`` at its master-user separator.

:class:`IdentityRules` describes that mapping (the config's ``identity:``
section) and :meth:`IdentityRules.account` applies it.  A name the rules
cannot map with certainty (empty, too long, control characters or spaces,
characters the server does not accept, an ambiguous master login) is
*refused*: popguard answers ``-ERR`` itself and the server never sees it.
Refusing is always safe; guessing is not (a guess that differs from the
server's is a policy bypass).

Pure functions over bytes and strings: no I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final, Literal

from popguard.core.grammar import escape_text

#: Dovecot's default ``auth_username_chars``: the characters a login name may
#: hold.  Names with any other character are refused before they reach the
#: server (Dovecot itself would reject them).
DOVECOT_USERNAME_CHARS: Final = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ01234567890.-_@"
)

#: The longest login name popguard accepts, in octets.  RFC 2449 bounds a
#: command line to 255 octets, so no USER or APOP name is longer; SASL
#: names are held to the same bound.  It also bounds what any per-user
#: table costs (throttle keys are digests, records cap the typed name).
MAX_LOGIN_NAME: Final = 255

#: How much of a name as typed goes into a record (``login``), in characters.
MAX_LOGIN_IN_RECORD: Final = 128

Case = Literal["lower", "exact"]
Domain = Literal["keep", "strip"]
Side = Literal["before", "after"]
Authzid = Literal["account", "refuse"]


class IdentityRefused(ValueError):
    """popguard cannot tell which account a login opens.  ``str()`` says why.

    ``login`` is the name as typed (escaped, capped) where one was read.
    """

    def __init__(self, reason: str, login: str | None = None) -> None:
        super().__init__(reason)
        self.login = login


@dataclass(frozen=True, slots=True)
class Account:
    """The account a login opens, as the upstream will name it."""

    #: The canonical account name: what policies match and records name.
    name: str
    #: The login name as the client typed it (escaped, capped): for records.
    login: str
    #: A master (proxy) user that authenticated on the account's behalf.
    master: str | None = None


@dataclass(frozen=True, slots=True)
class IdentityRules:
    """How the upstream maps a login name to an account (config ``identity:``).

    The defaults are Dovecot's: ASCII letters fold to lower case (``%Lu``),
    names keep their domain, there is no default realm and no master-user
    separator, and only Dovecot's default ``auth_username_chars`` are
    accepted.
    """

    #: ``lower``: ASCII A-Z fold to a-z, as Dovecot's ``%Lu`` (the default
    #: format) and most servers do.  ``exact``: names compare byte for byte.
    case: Case = "lower"
    #: ``strip``: the server drops ``@domain`` (Dovecot ``%n``).
    domain: Domain = "keep"
    #: Appended as ``@domain`` to a name without one (Dovecot ``auth_default_realm``).
    default_domain: str | None = None
    #: One character that splits ``account*master`` (Dovecot
    #: ``auth_master_user_separator``); None: no master logins by name.
    master_separator: str | None = None
    #: Which side of the separator names the account (Dovecot: ``before``).
    master_account: Side = "before"
    #: SASL PLAIN's authorization identity, when it differs from the
    #: authentication identity: ``account`` (it names the account, as in
    #: Dovecot, which then requires a master user) or ``refuse``.
    plain_authzid: Authzid = "account"
    #: The characters a login name may hold; None: any printable character
    #: except space.  Default: Dovecot's ``auth_username_chars``.
    allowed_chars: str | None = DOVECOT_USERNAME_CHARS

    def account(self, raw: bytes, *, authzid: bytes | None = None) -> Account:
        """The account that login name ``raw`` opens; raises :class:`IdentityRefused`.

        ``authzid`` is SASL PLAIN's authorization identity, where one was
        given and differs from ``raw`` (the authentication identity).
        """
        login = login_text(authzid or raw)
        try:
            return self._account(raw, authzid, login)
        except IdentityRefused as exc:
            exc.login = login
            raise

    def _account(self, raw: bytes, authzid: bytes | None, login: str) -> Account:
        if authzid:
            if self.plain_authzid == "refuse":
                raise IdentityRefused("an authorization identity is not accepted here")
            if self.master_separator is not None and self.master_separator.encode() in raw:
                raise IdentityRefused("both an authorization identity and a master user")
            return Account(self._name(authzid), login, master=self._name(raw))
        text = _checked(raw)
        separator = self.master_separator
        if separator is not None and separator in text:
            if text.count(separator) > 1:
                # Dovecot splits at the first; other servers at the last.
                raise IdentityRefused("more than one master-user separator")
            if self.master_account == "before":
                account, _, master = text.partition(separator)
            else:
                master, _, account = text.partition(separator)
            if not account or not master:
                raise IdentityRefused("an empty name beside the master-user separator")
            return Account(self._fold(account), login, master=self._fold(master))
        return Account(self._fold(text), login)

    def canonical(self, name: str) -> str:
        """A name from a policy rule or the command line, as an account (no checks)."""
        if self.default_domain and "@" not in name:
            name = f"{name}@{self.default_domain}"
        name = self.canonical_case(name)
        if self.domain == "strip":
            name = name.partition("@")[0]
        return name

    def _name(self, raw: bytes) -> str:
        return self._fold(_checked(raw))

    def _fold(self, name: str) -> str:
        """A checked login name as its account: the characters the server
        accepts (after the default realm, as Dovecot checks), then
        :meth:`canonical`."""
        if self.default_domain and "@" not in name:
            name = f"{name}@{self.default_domain}"
        allowed = self.allowed_chars
        if allowed is not None:
            for ch in name:
                if ch not in allowed:
                    raise IdentityRefused(
                        f"the name holds {escape_text(ch.encode())!r}, which the server's "
                        "name rules do not accept"
                    )
        account = self.canonical(name)
        if not account:
            raise IdentityRefused("an empty name before the domain")
        return account

    def canonical_case(self, name: str) -> str:
        return _ascii_lower(name) if self.case == "lower" else name


def _checked(raw: bytes) -> str:
    """The login name as text, or :class:`IdentityRefused` where it cannot be one."""
    if not raw:
        raise IdentityRefused("an empty name")
    if len(raw) > MAX_LOGIN_NAME:
        raise IdentityRefused(f"a name longer than {MAX_LOGIN_NAME} octets")
    if any(byte <= 0x20 or byte == 0x7F for byte in raw):
        raise IdentityRefused("a name with spaces or control characters")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise IdentityRefused("a name that is not UTF-8") from None


_UPPER = bytes(range(ord("A"), ord("Z") + 1)).decode()
_LOWER = bytes(range(ord("a"), ord("z") + 1)).decode()
_ASCII_FOLD: Final = str.maketrans(_UPPER, _LOWER)


def _ascii_lower(text: str) -> str:
    """A-Z to a-z and nothing else, as Dovecot's ``%L`` (``str.lower`` would
    also fold, say, the Kelvin sign to ``k``, which no such server does)."""
    return text.translate(_ASCII_FOLD)


def login_text(raw: bytes) -> str:
    """A login name as typed, for a record: escaped (CWE-117) and capped."""
    text = escape_text(raw[: MAX_LOGIN_IN_RECORD * 4])
    if len(text) > MAX_LOGIN_IN_RECORD:
        text = text[: MAX_LOGIN_IN_RECORD - 1] + "…"
    return text


def account_key(account: str) -> str:
    """A fixed-size key for an account in a per-user table (throttles, counts)."""
    return hashlib.blake2b(account.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


#: The default: Dovecot's rules.
DEFAULT_IDENTITY: Final = IdentityRules()
