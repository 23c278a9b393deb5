"""Signed commands and entries: the LEYLINE.md conventions, and every rejection code."""

from __future__ import annotations

import base64
import hashlib
import hmac

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


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _command() -> AdaptationCommand:
    return seed_command(SEED_OP_GERMINATE, issued_by="tamiyo", blueprint_id="bp")


def _signed_at(t: float) -> AdaptationCommand:
    cmd = _command()
    cmd.issued_at.FromNanoseconds(int(t * 1e9))
    return sign_command(cmd, SECRET)


def _code(verifier: CommandVerifier, cmd: AdaptationCommand) -> str:
    with pytest.raises(CommandRejected) as info:
        verifier.verify(cmd)
    return info.value.reason_code


def test_signature_is_hmac_of_deterministic_bytes_without_signature_annotation() -> None:
    cmd = sign_command(_command(), SECRET)
    bare = AdaptationCommand()
    bare.CopyFrom(cmd)
    del bare.annotations["signature"]
    expected = base64.b64encode(hmac.new(SECRET, bare.SerializeToString(deterministic=True), hashlib.sha256).digest())
    assert cmd.annotations["signature"] == expected.decode()


def test_sign_command_fills_missing_id_and_timestamp() -> None:
    cmd = AdaptationCommand(version=1)
    sign_command(cmd, SECRET)
    assert len(cmd.command_id) == 32 and cmd.HasField("issued_at") and cmd.annotations["signature"]


def test_valid_command_verifies_once_and_its_replay_is_rejected() -> None:
    clock = FakeClock(1_000_000.0)
    verifier = CommandVerifier(SECRET, clock=clock)
    cmd = _signed_at(clock.now)
    verifier.verify(cmd)
    assert "signature" in cmd.annotations  # verification does not strip the caller's command
    assert _code(verifier, cmd) == "replayed"


def test_forged_command_is_rejected() -> None:
    clock = FakeClock(1_000_000.0)
    cmd = _signed_at(clock.now)
    cmd.target_seed_id = "someone-else"  # altered after signing
    assert _code(CommandVerifier(SECRET, clock=clock), cmd) == "forged"
    other = _signed_at(clock.now)
    assert _code(CommandVerifier(b"other-secret", clock=clock), other) == "forged"
    other.annotations["signature"] = "!!not base64!!"
    assert _code(CommandVerifier(SECRET, clock=clock), other) == "forged"


def test_unsigned_command_is_rejected() -> None:
    assert _code(CommandVerifier(SECRET), _command()) == "unsigned"


def test_stale_and_future_commands_are_rejected() -> None:
    clock = FakeClock(1_000_000.0)
    verifier = CommandVerifier(SECRET, clock=clock)
    assert _code(verifier, _signed_at(clock.now - 61)) == "stale"
    assert _code(verifier, _signed_at(clock.now + 6)) == "future"
    verifier.verify(_signed_at(clock.now - 59))
    verifier.verify(_signed_at(clock.now + 4))


def test_signed_command_without_id_is_malformed() -> None:
    cmd = _signed_at(1_000_000.0)
    cmd.command_id = ""
    assert _code(CommandVerifier(SECRET, clock=FakeClock(1_000_000.0)), cmd) == "malformed"


def test_nonce_memory_expires_and_stays_bounded() -> None:
    clock = FakeClock(1_000_000.0)
    verifier = CommandVerifier(SECRET, clock=clock, max_nonces=3)
    for _ in range(10):
        verifier.verify(_signed_at(clock.now))
    assert len(verifier._seen) == 3
    clock.now += 301
    verifier.verify(_signed_at(clock.now))
    assert len(verifier._seen) == 1


def test_nonce_ttl_shorter_than_the_age_window_is_refused() -> None:
    with pytest.raises(ValueError, match="nonce_ttl_s"):
        CommandVerifier(SECRET, nonce_ttl_s=30)


def test_missing_secret_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ESPER_LEYLINE_SECRET", raising=False)
    with pytest.raises(SecretMissing, match="ESPER_LEYLINE_SECRET is not set"):
        load_secret()


def test_secret_comes_from_env_or_key_file(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("ESPER_LEYLINE_SECRET", "héllo")
    assert load_secret() == "héllo".encode()
    key = tmp_path / "key"
    key.write_bytes(b"from-file\n")
    assert load_secret(key_file=key) == b"from-file"
    with pytest.raises(SecretMissing, match="cannot read"):
        load_secret(key_file=tmp_path / "absent")


def test_payload_signature_round_trip_and_tamper() -> None:
    sig = sign_payload(b"payload", SECRET)
    assert verify_payload(b"payload", sig, SECRET)
    assert verify_payload(b"payload", sig.encode(), SECRET)
    assert not verify_payload(b"payloaD", sig, SECRET)
    assert not verify_payload(b"payload", "garbage***", SECRET)
