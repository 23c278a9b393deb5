"""A signature verifies only as the exact base64 of the exact HMAC: every other spelling is forged.

Truncated, extended and re-encoded signatures (other alphabets, whitespace, stray characters,
missing padding, hex) carry the same or part of the same digest; accepting any of them would let
a sender who never held the secret pass a command mangled in transit, or probe the comparison.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

import pytest

from esper.leyline import SEED_OP_GERMINATE, AdaptationCommand, seed_command
from esper.oona import (
    CommandRejected,
    CommandVerifier,
    SecretMissing,
    load_secret,
    sign_command,
    sign_payload,
    verify_payload,
)

SECRET = b"s3cret"
NOW = 1_000_000.0


def _clock() -> float:
    return NOW


def _signed(issued_at: float = NOW, secret: bytes = SECRET) -> AdaptationCommand:
    cmd = seed_command(SEED_OP_GERMINATE, issued_by="tamiyo", blueprint_id="bp")
    cmd.issued_at.FromNanoseconds(int(issued_at * 1e9))
    return sign_command(cmd, secret)


def _respelled(signature: str) -> dict[str, str]:
    """Spellings of `signature` that are not its exact standard base64 (most hold the same digest)."""
    digest = base64.b64decode(signature)
    return {
        "truncated by one character": signature[:-2] + signature[-1:],
        "padding dropped": signature.rstrip("="),
        "last digest character dropped": signature[:-1],
        "extended by a character": signature + "A",
        "extended by a padded block": signature + "AAAA",
        "digest plus one byte": base64.b64encode(digest + b"\x00").decode(),
        "digest less one byte": base64.b64encode(digest[:-1]).decode(),
        "url-safe alphabet, unpadded": base64.urlsafe_b64encode(digest).decode().rstrip("="),
        "newline inside": signature[:20] + "\n" + signature[20:],
        "space inside": signature[:10] + " " + signature[10:],
        "stray character": signature[:5] + "!" + signature[5:],
        "hex digest": binascii.hexlify(digest).decode(),
        "empty": "",
    }


def _reason(verifier: CommandVerifier, cmd: AdaptationCommand) -> str:
    with pytest.raises(CommandRejected) as info:
        verifier.verify(cmd)
    return info.value.reason_code


def test_the_exact_command_signature_verifies() -> None:
    CommandVerifier(SECRET, clock=_clock).verify(_signed())


# names only: the signatures themselves are made inside each test, never at collection
SPELLINGS = ["truncated by one character", "padding dropped", "last digest character dropped",
             "extended by a character", "extended by a padded block", "digest plus one byte", "digest less one byte",
             "url-safe alphabet, unpadded", "newline inside", "space inside", "stray character", "hex digest", "empty"]


def test_every_spelling_is_tried() -> None:
    assert list(_respelled(sign_payload(b"x", SECRET))) == SPELLINGS


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_a_command_signature_spelled_any_other_way_is_rejected(spelling: str) -> None:
    cmd = _signed()
    cmd.annotations["signature"] = _respelled(cmd.annotations["signature"])[spelling]
    expected = "unsigned" if spelling == "empty" else "forged"
    assert _reason(CommandVerifier(SECRET, clock=_clock), cmd) == expected


def test_a_command_whose_signature_has_a_url_safe_character_is_forged() -> None:
    # a signature holding '+' or '/' respelled in the url-safe alphabet decodes to other bytes, or fails
    for n in range(50):
        cmd = _signed(NOW - n)
        signature = cmd.annotations["signature"]
        if "+" in signature or "/" in signature:
            cmd.annotations["signature"] = signature.replace("+", "-").replace("/", "_")
            assert _reason(CommandVerifier(SECRET, clock=_clock), cmd) == "forged"
            return
    pytest.fail("no signature among 50 held '+' or '/'")


def test_a_command_signed_with_a_secret_sharing_a_prefix_is_forged() -> None:
    assert _reason(CommandVerifier(SECRET, clock=_clock), _signed(secret=SECRET + b"x")) == "forged"
    assert _reason(CommandVerifier(SECRET, clock=_clock), _signed(secret=SECRET[:-1])) == "forged"


def test_the_signature_is_checked_before_the_clock() -> None:
    # an unsigned-traffic probe of the time window learns nothing: a bad signature is "forged" at any age
    cmd = _signed(NOW - 3600)
    cmd.annotations["signature"] = cmd.annotations["signature"][:-1]
    assert _reason(CommandVerifier(SECRET, clock=_clock), cmd) == "forged"


@pytest.mark.parametrize(("offset", "accepted"), [(5.0, True), (5.5, False), (-60.0, True), (-60.5, False)])
def test_the_age_window_includes_its_limits(offset: float, accepted: bool) -> None:
    verifier = CommandVerifier(SECRET, clock=_clock, max_future_s=5.0, max_age_s=60.0)
    cmd = _signed(NOW + offset)
    if accepted:
        verifier.verify(cmd)
    else:
        assert _reason(verifier, cmd) == ("future" if offset > 0 else "stale")


def test_the_oldest_nonce_is_evicted_first_when_memory_is_full() -> None:
    verifier = CommandVerifier(SECRET, clock=_clock, max_nonces=2)
    first, second, third = _signed(NOW - 3), _signed(NOW - 2), _signed(NOW - 1)
    for cmd in (first, second, third):
        verifier.verify(cmd)
    assert _reason(verifier, third) == "replayed" and _reason(verifier, second) == "replayed"
    verifier.verify(first)  # evicted: the one a full memory forgets is the oldest


def test_a_payload_signature_spelled_any_other_way_is_rejected() -> None:
    signature = sign_payload(b"payload", SECRET)
    assert verify_payload(b"payload", signature, SECRET)
    for spelling, other in _respelled(signature).items():
        assert not verify_payload(b"payload", other, SECRET), spelling
        assert not verify_payload(b"payload", other.encode(), SECRET), spelling


def test_a_payload_signature_covers_every_byte() -> None:
    signature = sign_payload(b"payload", SECRET)
    for other in (b"payloa", b"payload\x00", b"", b"Payload"):
        assert not verify_payload(other, signature, SECRET), other
    assert not verify_payload(b"payload", signature, SECRET + b"x")


def test_a_replay_at_the_last_instant_of_the_age_window_is_still_rejected() -> None:
    # ttl = max_age + max_future, the least allowed: a command accepted max_future early is exactly
    # max_age old when its nonce reaches its expiry, so the clock alone would let it through
    now = [NOW]
    verifier = CommandVerifier(SECRET, clock=lambda: now[0], nonce_ttl_s=65.0, max_age_s=60.0, max_future_s=5.0)
    cmd = _signed(NOW + 5.0)
    verifier.verify(cmd)
    now[0] = NOW + 65.0
    assert _reason(verifier, cmd) == "replayed"
    now[0] = NOW + 65.5  # past the window: stale, whatever the nonce memory holds
    assert _reason(verifier, cmd) == "stale"


def test_expired_nonces_are_forgotten_oldest_first_and_newer_ones_kept() -> None:
    now = [NOW]
    verifier = CommandVerifier(SECRET, clock=lambda: now[0], nonce_ttl_s=100.0, max_age_s=90.0, max_future_s=5.0)
    old = _signed(NOW)
    verifier.verify(old)
    now[0] = NOW + 50.0
    newer = _signed(NOW + 50.0)
    verifier.verify(newer)
    now[0] = NOW + 101.0  # old's nonce expired, newer's has not
    verifier.verify(_signed(NOW + 101.0))
    assert _reason(verifier, newer) == "replayed"


def test_a_signature_does_not_depend_on_the_order_annotations_were_set() -> None:
    cmd = seed_command(SEED_OP_GERMINATE, issued_by="tamiyo", blueprint_id="bp")
    cmd.issued_at.FromNanoseconds(int(NOW * 1e9))
    keys = [f"note-{i}" for i in range(12)]
    for key in keys:
        cmd.annotations[key] = key.upper()
    sign_command(cmd, SECRET)
    received = AdaptationCommand()
    received.CopyFrom(cmd)
    received.annotations.clear()
    for key in [*reversed(keys), "signature"]:
        received.annotations[key] = cmd.annotations[key]
    CommandVerifier(SECRET, clock=_clock).verify(received)


@pytest.mark.parametrize(("mangle", "code", "message"), [
    (lambda c: c.annotations.pop("signature"), "unsigned",
     "command {id} has no annotations['signature']; sign it with the shared secret"),
    (lambda c: c.ClearField("issued_at"), "malformed", "signed commands need command_id and issued_at"),
    (lambda c: c.annotations.__setitem__("signature", c.annotations["signature"][:-1]), "forged",
     "command {id}: HMAC mismatch (wrong secret or altered command); check ESPER_LEYLINE_SECRET matches the sender's"),
])
def test_each_rejection_names_the_command_and_the_fix(mangle: object, code: str, message: str) -> None:
    cmd = _signed()
    mangle(cmd)  # type: ignore[operator]
    with pytest.raises(CommandRejected) as info:
        CommandVerifier(SECRET, clock=_clock).verify(cmd)
    assert info.value.reason_code == code and message.format(id=cmd.command_id) in str(info.value)


def test_an_unsigned_command_without_an_id_is_named_as_such() -> None:
    cmd = seed_command(SEED_OP_GERMINATE, issued_by="tamiyo", blueprint_id="bp")
    cmd.command_id = ""
    with pytest.raises(CommandRejected, match="command <no id> has no annotations"):
        CommandVerifier(SECRET, clock=_clock).verify(cmd)


def test_clock_rejections_say_how_far_off_and_the_limit() -> None:
    verifier = CommandVerifier(SECRET, clock=_clock)
    late, early = _signed(NOW - 61.0), _signed(NOW + 6.0)
    with pytest.raises(CommandRejected, match=r"issued 61\.0 s ago \(limit 60 s\)"):
        verifier.verify(late)
    with pytest.raises(CommandRejected, match=r"issued 6\.0 s in the future \(limit 5 s\); check the clocks"):
        verifier.verify(early)
    fresh = _signed(NOW)
    verifier.verify(fresh)
    with pytest.raises(CommandRejected, match=f"command {fresh.command_id} was already accepted within the last 300 s"):
        verifier.verify(fresh)


def test_a_verifier_is_a_callable_check() -> None:
    verifier = CommandVerifier(SECRET, clock=_clock)
    cmd = _signed()
    verifier(cmd)
    with pytest.raises(CommandRejected) as info:
        verifier(cmd)
    assert info.value.reason_code == "replayed"


def test_the_verifier_limits_are_inclusive_and_bad_ones_named() -> None:
    CommandVerifier(SECRET, nonce_ttl_s=65.0, max_age_s=60.0, max_future_s=5.0)
    CommandVerifier(SECRET, max_nonces=1)
    with pytest.raises(ValueError, match="max_nonces=0 must be >= 1"):
        CommandVerifier(SECRET, max_nonces=0)
    with pytest.raises(SecretMissing, match="CommandVerifier needs a non-empty secret"):
        CommandVerifier(b"")
    # the nonce must outlive the whole window a command is accepted in: age plus future skew
    with pytest.raises(ValueError, match=r"nonce_ttl_s=62.0 must be >= max_age_s \+ max_future_s \(65.0\)"):
        CommandVerifier(SECRET, nonce_ttl_s=62.0, max_age_s=60.0, max_future_s=5.0)


def test_a_key_file_loses_only_its_line_ending(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"XsecretX \t\r\n")
    assert load_secret(key_file=key) == b"XsecretX \t"
    key.write_bytes(b"secretX\n")
    assert load_secret(key_file=key) == b"secretX"
    key.write_bytes(b"\n")
    with pytest.raises(SecretMissing, match="is empty; write the shared secret into it"):
        load_secret(key_file=key)
