"""HMAC signing of stream entries and AdaptationCommands (LEYLINE.md, "Signed commands").

Entry signature: base64(HMAC-SHA256(secret, payload bytes)) in the entry's `signature` field.
Command signature: set `command_id` and `issued_at` when missing, drop `annotations["signature"]`,
base64(HMAC-SHA256(secret, SerializeToString(deterministic=True))) into `annotations["signature"]`.
Both sides must use the same secret: the UTF-8 bytes of `ESPER_LEYLINE_SECRET`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from esper.leyline import AdaptationCommand, new_id, now_timestamp
from esper.oona.errors import CommandRejected, SecretMissing

SECRET_ENV = "ESPER_LEYLINE_SECRET"
SIGNATURE_KEY = "signature"


def load_secret(env: str = SECRET_ENV, key_file: str | Path | None = None) -> bytes:
    """The shared secret: the contents of `key_file` when given (trailing newline dropped), else
    the UTF-8 bytes of environment variable `env`. Raises `SecretMissing` naming both options."""
    if key_file is not None:
        path = Path(key_file)
        try:
            secret = path.read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise SecretMissing(f"cannot read the Leyline key file {path}: {exc}; check the path") from exc
        if not secret:
            raise SecretMissing(f"the Leyline key file {path} is empty; write the shared secret into it")
        return secret
    value = os.environ.get(env, "")
    if not value:
        raise SecretMissing(
            f"{env} is not set: export {env}=<shared secret> (the value Esper's other subsystems use) "
            "or pass a key file; Oona signs every entry and command with it"
        )
    return value.encode("utf-8")


def sign_payload(data: bytes, secret: bytes) -> str:
    """base64 HMAC-SHA256 of `data`: the `signature` field of an Oona stream entry."""
    return base64.b64encode(hmac.new(secret, data, hashlib.sha256).digest()).decode("ascii")


def verify_payload(data: bytes, signature: str | bytes, secret: bytes) -> bool:
    """True when `signature` is the base64 HMAC-SHA256 of `data`; constant-time comparison."""
    try:
        given = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(given, hmac.new(secret, data, hashlib.sha256).digest())


def _command_digest(cmd: AdaptationCommand, secret: bytes) -> bytes:
    """HMAC over the command as serialized without its signature annotation (cmd is not mutated)."""
    unsigned = AdaptationCommand()
    unsigned.CopyFrom(cmd)
    unsigned.annotations.pop(SIGNATURE_KEY, None)
    return hmac.new(secret, unsigned.SerializeToString(deterministic=True), hashlib.sha256).digest()


def sign_command(cmd: AdaptationCommand, secret: bytes) -> AdaptationCommand:
    """Sign `cmd` in place and return it. Sets `command_id` (uuid4 hex) and `issued_at` (now)
    when they are missing; any previous signature is replaced."""
    if not cmd.command_id:
        cmd.command_id = new_id()
    if not cmd.HasField("issued_at"):
        cmd.issued_at.CopyFrom(now_timestamp())
    cmd.annotations.pop(SIGNATURE_KEY, None)
    cmd.annotations[SIGNATURE_KEY] = base64.b64encode(_command_digest(cmd, secret)).decode("ascii")
    return cmd


class CommandVerifier:
    """Verifies signed commands: authenticity, freshness, and single use.

    `verify(cmd)` returns None for a good command and raises `CommandRejected` otherwise. The
    signature is checked before the timestamps, so an attacker cannot probe the clock window with
    unsigned traffic. A verified command's id is remembered for `nonce_ttl_s`; at most
    `max_nonces` ids are kept (oldest evicted first). Since the TTL must exceed the accepted age
    window, an evicted id belongs to a command that would now be rejected as stale anyway unless
    more than `max_nonces` commands arrived within `max_age_s`.
    Thread-safe use needs external locking; Tolaria verifies on one thread.
    """

    def __init__(self, secret: bytes, *, nonce_ttl_s: float = 300.0, max_future_s: float = 5.0,
                 max_age_s: float = 60.0, max_nonces: int = 100_000,
                 clock: Callable[[], float] = time.time) -> None:
        if not secret:
            raise SecretMissing(f"CommandVerifier needs a non-empty secret; see load_secret() and {SECRET_ENV}")
        if nonce_ttl_s < max_age_s + max_future_s:
            raise ValueError(f"nonce_ttl_s={nonce_ttl_s} must be >= max_age_s + max_future_s "
                             f"({max_age_s + max_future_s}) or a stale-window replay slips through")
        if max_nonces < 1:
            raise ValueError(f"max_nonces={max_nonces} must be >= 1")
        self._secret = secret
        self.nonce_ttl_s = nonce_ttl_s
        self.max_future_s = max_future_s
        self.max_age_s = max_age_s
        self.max_nonces = max_nonces
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()  # command_id -> expiry, in expiry order

    def verify(self, cmd: AdaptationCommand) -> None:
        """Accept `cmd` once, or raise `CommandRejected` with the reason code."""
        signature = cmd.annotations.get(SIGNATURE_KEY, "")
        if not signature:
            raise CommandRejected("unsigned", f"command {cmd.command_id or '<no id>'} has no "
                                  f"annotations[{SIGNATURE_KEY!r}]; sign it with the shared secret")
        if not cmd.command_id or not cmd.HasField("issued_at"):
            raise CommandRejected("malformed", "signed commands need command_id and issued_at")
        if not self._signature_matches(cmd, signature):
            raise CommandRejected("forged", f"command {cmd.command_id}: HMAC mismatch (wrong secret or altered "
                                  f"command); check {SECRET_ENV} matches the sender's")
        self._check_time(cmd)
        self._remember(cmd.command_id)

    def _signature_matches(self, cmd: AdaptationCommand, signature: str) -> bool:
        try:
            given = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(given, _command_digest(cmd, self._secret))

    def _check_time(self, cmd: AdaptationCommand) -> None:
        skew = cmd.issued_at.ToNanoseconds() / 1e9 - self._clock()
        if skew > self.max_future_s:
            raise CommandRejected("future", f"command {cmd.command_id} issued {skew:.1f} s in the future "
                                  f"(limit {self.max_future_s:g} s); check the clocks")
        if -skew > self.max_age_s:
            raise CommandRejected("stale", f"command {cmd.command_id} issued {-skew:.1f} s ago "
                                  f"(limit {self.max_age_s:g} s)")

    def _remember(self, command_id: str) -> None:
        now = self._clock()
        # A nonce lives through its expiry instant: with nonce_ttl_s == max_age_s + max_future_s, a
        # command accepted max_future_s early is exactly max_age_s old then, and passes the clock.
        while self._seen and next(iter(self._seen.values())) < now:
            self._seen.popitem(last=False)
        if command_id in self._seen:
            raise CommandRejected("replayed", f"command {command_id} was already accepted "
                                  f"within the last {self.nonce_ttl_s:g} s")
        if len(self._seen) >= self.max_nonces:
            self._seen.popitem(last=False)
        self._seen[command_id] = now + self.nonce_ttl_s

    def __call__(self, cmd: AdaptationCommand) -> None:
        """Same as `verify`: lets a verifier be passed where a callable check is expected."""
        self.verify(cmd)
