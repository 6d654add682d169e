"""Site keys: the key file, signatures and names derived from the public key."""

from __future__ import annotations

import os
import pickle
import re
import stat
from pathlib import Path

import nacl.public
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.trust import base32
from meshd.errors import KeyFileError, LocalError
from meshd.trust.identity import (
    KEY_FILE_HEADER,
    SiteKey,
    curve_public_of,
    fingerprint_of,
    site_id_of,
    verify_signature,
)

SEED = bytes(range(32))


@pytest.fixture
def key() -> SiteKey:
    return SiteKey(SEED)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- names ---------------------------------------------------------------------------------


def test_site_id_is_32_lowercase_base32(key: SiteKey) -> None:
    assert key.site_id == site_id_of(key.public)
    assert re.fullmatch(r"[a-z2-7]{32}", key.site_id)


def test_fingerprint_is_12_crockford_symbols_grouped(key: SiteKey) -> None:
    assert key.fingerprint == fingerprint_of(key.public)
    assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{4}(-[0-9A-HJKMNP-TV-Z]{4}){2}", key.fingerprint)
    assert all(base32.is_symbol(c) for c in key.fingerprint.replace("-", ""))


def test_names_differ_between_keys() -> None:
    a, b = SiteKey.generate(), SiteKey.generate()
    assert a.public != b.public
    assert a.site_id != b.site_id
    assert a.fingerprint != b.fingerprint


def test_names_are_stable_for_a_seed() -> None:
    assert SiteKey(SEED).site_id == SiteKey(SEED).site_id
    assert SiteKey(SEED).fingerprint == SiteKey(SEED).fingerprint


# --- signatures ----------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(message=st.binary(max_size=512))
def test_sign_verify_round_trip(message: bytes) -> None:
    key = SiteKey(SEED)
    sig = key.sign(message)
    assert len(sig) == 64
    assert verify_signature(key.public, message, sig)
    assert not verify_signature(key.public, message + b"x", sig)


def test_signature_interoperates_with_pynacl(key: SiteKey) -> None:
    sig = key.sign(b"hello")
    nacl.signing.VerifyKey(key.public).verify(b"hello", sig)


@pytest.mark.parametrize(
    "public, message, signature",
    [
        (b"\x00" * 31, b"m", b"\x00" * 64),
        (b"\x00" * 32, b"m", b"\x00" * 64),  # small-order key
        (b"\xff" * 32, b"m", b"\x00" * 64),  # not a point
        ("k" * 32, b"m", b"\x00" * 64),
        (None, None, None),
        (b"\x00" * 32, "m", b"\x00" * 64),
        (b"\x00" * 32, b"m", b"\x00" * 63),
        (bytearray(32), b"m", bytearray(64)),
    ],
)
def test_verify_signature_is_false_on_bad_input(
    public: object, message: object, signature: object
) -> None:
    assert verify_signature(public, message, signature) is False  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(public=st.binary(), message=st.binary(max_size=64), signature=st.binary())
def test_verify_signature_never_raises(public: bytes, message: bytes, signature: bytes) -> None:
    assert verify_signature(public, message, signature) is False


def test_wrong_key_does_not_verify(key: SiteKey) -> None:
    other = SiteKey.generate()
    assert not verify_signature(other.public, b"m", key.sign(b"m"))


def test_curve_keypair_is_a_matching_x25519_pair(key: SiteKey) -> None:
    public, secret = key.curve_keypair()
    assert len(public) == len(secret) == 32
    assert bytes(nacl.public.PrivateKey(secret).public_key) == public
    assert curve_public_of(key.public) == public


def test_curve_public_of_rejects_bad_keys() -> None:
    with pytest.raises(ValueError):
        curve_public_of(b"short")


# --- secrecy -------------------------------------------------------------------------------


def test_repr_does_not_leak_the_seed(key: SiteKey) -> None:
    text = repr(key) + str(key)
    assert key.site_id in text
    assert SEED.hex() not in text
    assert SEED.hex().upper() not in text
    assert repr(SEED) not in text
    assert base32.encode(SEED) not in text


def test_key_is_not_picklable(key: SiteKey) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(key)


def test_bad_seed_is_refused() -> None:
    with pytest.raises(ValueError):
        SiteKey(b"short")


# --- key file ------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path, key: SiteKey) -> None:
    path = tmp_path / "site.key"
    key.save(path)
    loaded = SiteKey.load(path)
    assert loaded.public == key.public
    assert verify_signature(key.public, b"m", loaded.sign(b"m"))
    assert path.read_text() == f"{KEY_FILE_HEADER}\n{SEED.hex()}\n"


def test_save_is_0600_even_with_a_permissive_umask(tmp_path: Path, key: SiteKey) -> None:
    old = os.umask(0)
    try:
        key.save(tmp_path / "site.key")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "site.key") == 0o600


def test_save_leaves_no_temporary_files(tmp_path: Path, key: SiteKey) -> None:
    key.save(tmp_path / "site.key")
    assert os.listdir(tmp_path) == ["site.key"]


def test_save_refuses_to_overwrite(tmp_path: Path, key: SiteKey) -> None:
    path = tmp_path / "site.key"
    path.write_text("precious")
    with pytest.raises(KeyFileError) as err:
        SiteKey.generate().save(path)
    assert err.value.reason == "exists"
    assert isinstance(err.value, LocalError)
    assert path.read_text() == "precious"
    assert os.listdir(tmp_path) == ["site.key"]


def test_save_refuses_to_overwrite_a_dangling_symlink(tmp_path: Path, key: SiteKey) -> None:
    path = tmp_path / "site.key"
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(KeyFileError) as err:
        key.save(path)
    assert err.value.reason == "exists"
    assert not (tmp_path / "elsewhere").exists()


def test_save_into_missing_directory_is_unwritable(tmp_path: Path, key: SiteKey) -> None:
    with pytest.raises(KeyFileError) as err:
        key.save(tmp_path / "no" / "site.key")
    assert err.value.reason == "unwritable"


def test_load_missing(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as err:
        SiteKey.load(tmp_path / "nope")
    assert err.value.reason == "missing"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o601, 0o610])
def test_load_refuses_group_or_other_bits(tmp_path: Path, key: SiteKey, mode: int) -> None:
    path = tmp_path / "site.key"
    key.save(path)
    os.chmod(path, mode)
    with pytest.raises(KeyFileError) as err:
        SiteKey.load(path)
    assert err.value.reason == "permissions"
    assert f"chmod 600 {path}" in err.value.message
    assert f"{mode:04o}" in err.value.message


def test_load_accepts_0400(tmp_path: Path, key: SiteKey) -> None:
    path = tmp_path / "site.key"
    key.save(path)
    os.chmod(path, 0o400)
    assert SiteKey.load(path).public == key.public


def test_load_refuses_a_file_owned_by_another_user(
    tmp_path: Path, key: SiteKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "site.key"
    key.save(path)
    real = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real + 1)
    with pytest.raises(KeyFileError) as err:
        SiteKey.load(path)
    assert err.value.reason == "permissions"
    assert "chmod 600" in err.value.message


def test_load_directory_is_unreadable(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)
    with pytest.raises(KeyFileError) as err:
        SiteKey.load(tmp_path)
    assert err.value.reason == "unreadable"


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"meshd-site-key-v1\n",
        f"meshd-site-key-v2\n{SEED.hex()}\n".encode(),
        f"meshd-site-key-v1\n{SEED.hex()}".encode(),  # no final newline
        f"meshd-site-key-v1\n{SEED.hex()}\n\n".encode(),
        f"meshd-site-key-v1\n{SEED.hex()[:-2]}\n".encode(),
        f"meshd-site-key-v1\n{SEED.hex()}00\n".encode(),
        f"meshd-site-key-v1\n{SEED.hex()[:-1]}g\n".encode(),
        f"meshd-site-key-v1\n{' ' + SEED.hex()[1:]}\n".encode(),
        f"meshd-site-key-v1\r\n{SEED.hex()}\r\n".encode(),
        b"meshd-site-key-v1\n\xff\xfe\n",
        b"x" * 10_000,
    ],
)
def test_load_malformed(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "site.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(KeyFileError) as err:
        SiteKey.load(path)
    assert err.value.reason == "malformed"
    assert SEED.hex() not in err.value.message


def test_load_accepts_uppercase_hex(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, f"{KEY_FILE_HEADER}\n{SEED.hex().upper()}\n".encode())
    os.close(fd)
    assert SiteKey.load(path).public == SiteKey(SEED).public
