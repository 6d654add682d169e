"""Measure the AEAD candidates for the channel data path; print JSON.

    python bench/cipher.py [--seconds 0.2] [--rounds 3]

One process, one run, one core: pynacl ChaCha20-Poly1305-IETF, pynacl AES-256-GCM (only where
libsodium reports AES-NI + PCLMUL), ``cryptography`` AESGCM (256- and 128-bit keys) and
ChaCha20Poly1305, at 64 B, 64 KiB,
1 MiB and 16 MiB, encrypt and decrypt, in MB/s (10**6 bytes of plaintext per second; for 64 B
also messages per second).  Each figure is the best of ``--rounds`` timed loops of at least
``--seconds`` each.  The ``cryptography`` ciphers are also measured on the zero-copy-ish paths
the channel uses: a read-only ``memoryview`` of a numpy array as input (no ``bytes()`` copy),
and ``encrypt_into``/``decrypt_into`` a preallocated buffer (no output allocation).  Then
``meshd_frames``: meshd's own ``Sealer.seal`` of a numpy array and ``Opener.open``, next to the
naive copy-then-encrypt path.  ``encrypt_into_cold_MBps`` (1 MiB, 16 MiB) encrypts from and
into buffers rotating through 256 MiB, as a stream does (data not in cache); the other figures
reuse one buffer and so run from cache.

This is a benchmark, not a test: figures vary with the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

SIZES = {"64B": 64, "64KiB": 64 << 10, "1MiB": 1 << 20, "16MiB": 16 << 20}
AAD = b"\x00" * 32  # the size of a channel frame header


def _time(fn: Callable[[], object], nbytes: int, seconds: float, rounds: int) -> float:
    """Best bytes/second over ``rounds`` loops of at least ``seconds`` each."""
    fn()  # warm up (first touch of output pages, lazy init)
    best = 0.0
    for _ in range(rounds):
        n = 0
        start = time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        best = max(best, n * nbytes / elapsed)
    return best


def _aes_ni_in_libsodium() -> bool:
    try:
        import nacl.bindings  # noqa: F401  (sodium_init detects the CPU features first)
        from nacl._sodium import lib  # private, but pynacl 1.6 exposes no public probe

        return bool(lib.crypto_aead_aes256gcm_is_available() == 1)
    except Exception:
        return False


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(flags & {"aes", "pclmulqdq", "avx2", "vaes", "vpclmulqdq"})
    except OSError:
        pass
    return []


def candidates() -> dict[str, dict[str, Callable[..., Any]]]:
    """name -> {"enc": f(nonce, data, aad) -> ct, "dec": f(nonce, ct, aad) -> pt, [into variants]}"""
    import nacl.bindings as nb
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    key = os.urandom(32)
    out: dict[str, dict[str, Callable[..., Any]]] = {}
    out["pynacl-chacha20poly1305-ietf"] = {
        "enc": lambda n, d, a: nb.crypto_aead_chacha20poly1305_ietf_encrypt(d, a, n, key),
        "dec": lambda n, c, a: nb.crypto_aead_chacha20poly1305_ietf_decrypt(c, a, n, key),
    }
    if _aes_ni_in_libsodium():
        out["pynacl-aes256gcm"] = {
            "enc": lambda n, d, a: nb.crypto_aead_aes256gcm_encrypt(d, a, n, key),
            "dec": lambda n, c, a: nb.crypto_aead_aes256gcm_decrypt(c, a, n, key),
        }
    for name, cls, klen in (("cryptography-aesgcm", AESGCM, 32),
                            ("cryptography-aes128gcm", AESGCM, 16),
                            ("cryptography-chacha20poly1305", ChaCha20Poly1305, 32)):
        aead = cls(key[:klen])
        out[name] = {"enc": aead.encrypt, "dec": aead.decrypt,
                     "enc_into": aead.encrypt_into, "dec_into": aead.decrypt_into}
    return out


def run(seconds: float, rounds: int) -> dict[str, Any]:
    nonce = os.urandom(12)
    results: dict[str, Any] = {}
    for name, fns in candidates().items():
        per: dict[str, Any] = {}
        for label, size in SIZES.items():
            arr = np.frombuffer(os.urandom(size), dtype=np.uint8).copy()
            data = arr.tobytes()
            ct = fns["enc"](nonce, data, AAD)
            row: dict[str, Any] = {
                "encrypt_MBps": _time(lambda: fns["enc"](nonce, data, AAD), size, seconds, rounds)
                / 1e6,
                "decrypt_MBps": _time(lambda: fns["dec"](nonce, ct, AAD), size, seconds, rounds)
                / 1e6,
            }
            if "enc_into" in fns:
                view = arr.data.toreadonly()
                buf = np.empty(size + 16, dtype=np.uint8)
                pbuf = np.empty(size, dtype=np.uint8)
                row["encrypt_memoryview_MBps"] = _time(
                    lambda: fns["enc"](nonce, view, AAD), size, seconds, rounds) / 1e6
                row["encrypt_into_MBps"] = _time(
                    lambda: fns["enc_into"](nonce, view, AAD, buf), size, seconds, rounds) / 1e6
                row["decrypt_into_MBps"] = _time(
                    lambda: fns["dec_into"](nonce, ct, AAD, pbuf), size, seconds, rounds) / 1e6
                assert bytes(buf) == ct and bytes(pbuf) == data
                if size >= 1 << 20:  # a stream's data is not in cache: rotate through 256 MiB
                    k = max(2, (128 << 20) // size)
                    srcs = [np.frombuffer(os.urandom(size), dtype=np.uint8) for _ in range(k)]
                    dsts = [np.empty(size + 16, dtype=np.uint8) for _ in range(k)]
                    turn = [0]

                    def cold() -> None:
                        i = turn[0] = (turn[0] + 1) % k
                        fns["enc_into"](nonce, srcs[i], AAD, dsts[i])

                    row["encrypt_into_cold_MBps"] = _time(cold, size, seconds, rounds) / 1e6
                    del srcs, dsts
            if size == 64:
                row["encrypt_msgs_per_s"] = row["encrypt_MBps"] * 1e6 / size
            per[label] = {k: round(v, 1) for k, v in row.items()}
        results[name] = per
    return results


def run_frames(seconds: float, rounds: int) -> dict[str, Any]:
    """meshd's own frame path (``Sealer.seal`` / ``Opener.open``) against the copies it avoids:
    ``seal_numpy`` seals a numpy array in place (memoryview in, ``encrypt_into`` the frame);
    ``copy_then_encrypt`` is the naive path (``arr.tobytes()``, ``encrypt``, header + ct)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from meshd.channel import frames

    key, ch = os.urandom(32), os.urandom(16)
    out: dict[str, Any] = {}
    for cipher, name in ((frames.AES256GCM, "aesgcm"), (frames.CHACHA20POLY1305, "chacha")):
        sealer = frames.Sealer(cipher, key, ch, frames.DIR_I2R)
        opener = frames.Opener(cipher, key, ch, frames.DIR_I2R)
        per: dict[str, Any] = {}
        for label, size in SIZES.items():
            arr = np.frombuffer(os.urandom(size), dtype=np.uint8).copy()
            frame = sealer.seal(1, arr)
            row = {
                "seal_numpy_MBps": _time(lambda: sealer.seal(1, arr), size, seconds, rounds),
                "open_MBps": _time(lambda: opener.open(frame), size, seconds, rounds),
            }
            if cipher == frames.AES256GCM:
                aead, header, nonce = AESGCM(key), bytes(32), os.urandom(12)
                row["copy_then_encrypt_MBps"] = _time(
                    lambda: header + aead.encrypt(nonce, arr.tobytes(), header), size, seconds,
                    rounds)
            per[label] = {k: round(v / 1e6, 1) for k, v in row.items()}
        out[name] = per
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=0.2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    import cryptography
    import nacl

    report = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_flags": _cpu_flags(),
        "libsodium_aes256gcm_available": _aes_ni_in_libsodium(),
        "pynacl": nacl.__version__,
        "cryptography": cryptography.__version__,
        "seconds_per_round": args.seconds,
        "rounds": args.rounds,
        "results": run(args.seconds, args.rounds),
        "meshd_frames": run_frames(args.seconds, args.rounds),
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
