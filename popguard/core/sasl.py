"""SASL (RFC 5034) as popguard must read it: which account does this login open?

popguard lets a SASL exchange through only where it can tell, from the
client's responses, the login name the server will see.  Two rules make
that certain rather than hopeful:

* **One decoding, forwarded.**  Base64 is decoded leniently (whitespace
  skipped, missing padding tolerated, as Dovecot's decoder does) and what
  goes upstream is the *canonical* encoding of the decoded bytes.  The server
  therefore decodes exactly the bytes popguard decoded, whatever its own
  base64 rules are.  A client that already sends canonical base64 (every
  real one) sees its bytes relayed unchanged.
* **Refuse what is ambiguous.**  Mechanisms whose account popguard cannot
  read (SCRAM, GSSAPI, EXTERNAL, OAuth...) are refused before they reach the
  server, and so is every encoding that servers read differently: an initial
  response to CRAM-MD5 (RFC 2195 has none; Dovecot ignores it and asks
  again), ``=`` for LOGIN (an empty user name to some servers, "no initial
  response" to others), a second name where a mechanism has one.

Each :class:`SaslLogin` follows one exchange: :meth:`SaslLogin.initial` for
the ``AUTH`` line, :meth:`SaslLogin.challenge` for each server ``+`` line,
:meth:`SaslLogin.response` for each client line.  They return what to
forward, or raise :class:`~popguard.core.identity.IdentityRefused`.  Nothing
here keeps a password: only the account is kept.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Final

from popguard.core.grammar import escape_text, strip_line_ending
from popguard.core.identity import Account, IdentityRefused, IdentityRules

#: The mechanisms whose account popguard can read from the exchange.
DECODABLE: Final = frozenset({"PLAIN", "LOGIN", "CRAM-MD5"})

#: A mechanism name (RFC 4422 §3.1: 1-20 of A-Z, 0-9, "-" and "_").
_MECHANISM = re.compile(rb"[A-Za-z0-9_-]{1,20}\Z")
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*\Z")
_WHITESPACE = b" \t\r\n"


def decode_base64(text: bytes) -> bytes:
    """Base64 as lenient servers read it, or :class:`IdentityRefused`.

    Space, tab, CR and LF are skipped anywhere; missing padding is supplied.
    Anything else that is not RFC 4648 base64 is refused: a character
    outside the alphabet, data after padding, or a length no padding fixes.
    """
    data = text.translate(None, _WHITESPACE)
    body = data.rstrip(b"=")
    padding = len(data) - len(body)
    if (
        not _BASE64.match(body)
        or len(body) % 4 == 1
        or padding > 2
        or (padding and (len(body) + padding) % 4)
    ):
        raise IdentityRefused("a SASL response that is not base64")
    return base64.b64decode(body + b"=" * (-len(body) % 4))


def encode_base64(data: bytes) -> bytes:
    return base64.b64encode(data)


def mechanism_name(word: bytes) -> str | None:
    """The mechanism named in ``AUTH word``, upper-cased; None if malformed."""
    return word.decode("ascii").upper() if _MECHANISM.match(word) else None


@dataclass(slots=True)
class SaslLogin:
    """One SASL exchange, as far as the account is concerned."""

    mechanism: str
    rules: IdentityRules
    #: The account, once a response named it.
    account: Account | None = None
    #: The server's last challenge, decoded and lower-cased (LOGIN prompts).
    prompt: bytes = b""

    def initial(self, response: bytes | None) -> bytes | None:
        """The initial response (the rest of the AUTH line), as it goes upstream."""
        if response is None:
            return None
        mechanism = self.mechanism
        if mechanism == "CRAM-MD5":
            raise IdentityRefused("CRAM-MD5 takes no initial response (RFC 2195)")
        if response == b"=":
            if mechanism == "LOGIN":
                # "No initial response" to Dovecot, an empty user name to others.
                raise IdentityRefused("LOGIN with an empty initial response is ambiguous")
            return response  # PLAIN: an empty message, which names no one
        return self._named(decode_base64(response))

    def challenge(self, line: bytes) -> None:
        """A server ``+`` line: what it asks for next (LOGIN's prompts)."""
        text = strip_line_ending(line)[1:].strip()
        try:
            self.prompt = decode_base64(text).strip().lower()
        except IdentityRefused:
            self.prompt = b""

    def response(self, line: bytes) -> bytes:
        """A client response line (no line ending), as it goes upstream."""
        body = line.strip(_WHITESPACE)
        if self.mechanism == "LOGIN" and self.account is not None:
            if self.prompt.startswith(b"user"):
                raise IdentityRefused("the server asked for a second user name")
            return body  # the password: relayed as it is, never decoded
        if self.account is not None:
            raise IdentityRefused(f"{self.mechanism} names one account, in one response")
        if self.mechanism == "LOGIN" and self.prompt.startswith(b"pass"):
            raise IdentityRefused("the server asked for a password before a user name")
        if not body:
            if self.mechanism == "LOGIN":
                raise IdentityRefused("an empty user name")
            return body  # names no one; the server fails it or asks again
        return self._named(decode_base64(body))

    def _named(self, data: bytes) -> bytes:
        """Read the account from a decoded response; its canonical encoding."""
        rules = self.rules
        if self.mechanism == "PLAIN":
            # authzid NUL authcid NUL passwd (RFC 4616 §2)
            parts = data.split(b"\0", 2)
            if len(parts) != 3:
                raise IdentityRefused("a PLAIN response that is not authzid, authcid, password")
            authzid, authcid = parts[0], parts[1]
            if authzid and authzid != authcid:
                self.account = rules.account(authcid, authzid=authzid)
            else:
                self.account = rules.account(authcid)
        elif self.mechanism == "LOGIN":
            self.account = rules.account(data)
        else:  # CRAM-MD5: user SP digest, the user up to the last space (RFC 2195 §2)
            user, space, _ = data.rpartition(b" ")
            if not space:
                raise IdentityRefused("a CRAM-MD5 response that is not user and digest")
            self.account = rules.account(user)
        return encode_base64(data)


@dataclass(slots=True)
class SaslExchange:
    """One AUTH exchange as the session follows it."""

    mechanism: str
    #: Reads the account from the responses.
    login: SaslLogin
    #: Whose line comes next: the server's (challenge or result) or the
    #: client's (a response to a challenge).
    awaiting_server: bool = True
    #: popguard cancelled the exchange with "*" (a policy refused the
    #: account, or popguard could not tell it): the client gets this reply
    #: instead of the server's -ERR.
    denied: bytes | None = None


def auth_label(rest: bytes) -> str | None:
    """How records name an AUTH's mechanism: its name, or as given, escaped."""
    name = rest.partition(b" ")[0]
    return mechanism_name(name) or escape_text(name[:20]) or None


def open_auth(rest: bytes, rules: IdentityRules) -> tuple[SaslExchange, bytes]:
    """An ``AUTH mechanism [initial-response]`` line (``rest``: after "AUTH ").

    Returns the exchange to follow and what goes upstream after "AUTH ": the
    mechanism as given, then the initial response canonically re-encoded.
    Raises :class:`IdentityRefused` for a line popguard must refuse: a
    malformed one, a mechanism whose account it cannot read, an empty
    initial response, or one :meth:`SaslLogin.initial` refuses.
    """
    name, space, initial = rest.partition(b" ")
    mechanism = mechanism_name(name)
    if mechanism is None:
        raise IdentityRefused("a malformed AUTH command")
    if mechanism not in DECODABLE:
        raise IdentityRefused(
            f"popguard cannot tell which account {mechanism} logs in to; "
            "use " + ", ".join(sorted(DECODABLE))
        )
    if space and not initial:
        raise IdentityRefused("an empty initial response")
    login = SaslLogin(mechanism, rules)
    forwarded = login.initial(initial if space else None)
    line = name if forwarded is None else name + b" " + forwarded
    return SaslExchange(mechanism, login), line
