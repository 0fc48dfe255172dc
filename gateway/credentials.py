"""Secrets and signing keys, kept out of logs, reprs and error messages.

:class:`Secret` wraps a client secret or a PEM private key from the settings: its ``repr`` and
``str`` are a fixed placeholder, so printing :class:`~gateway.config.Settings`, a client or an
exception never shows the value. Only :meth:`Secret.reveal` does, at the one place that sends
or signs with it.

:func:`load_signing_key` turns a PEM private key into the key that signs SMART Backend Services
client assertions (SMART App Launch 2.x, "Client Authentication: Asymmetric": RS384 with an RSA
key, ES384 with an EC P-384 key).
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from joserfc.jwk import ECKey, RSAKey

#: Algorithms a SMART client must support for its assertions (client-confidential-asymmetric).
SIGNING_ALGORITHMS = ("RS384", "ES384")


class Secret:
    """A secret string that never shows itself, except through :meth:`reveal`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself: call only where it is sent or used to sign."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(Secret)

    def __bool__(self) -> bool:
        return bool(self._value)


def load_signing_key(pem: Secret, algorithm: str | None) -> tuple[RSAKey | ECKey, str]:
    """Import a PEM private key for signing client assertions.

    Parameters
    ----------
    pem
        The private key (PKCS#8 or traditional PEM, unencrypted).
    algorithm
        ``RS384`` or ``ES384``; ``None`` picks the one that fits the key.

    Returns
    -------
    tuple
        The key and the JWS algorithm to sign with.

    Raises
    ------
    ValueError
        The text is not an RSA or EC P-384 private key, or does not fit ``algorithm``. The
        message never quotes the key.
    """
    # Imported here: settings (which load this module) are read by every process, and only
    # the publisher signs (joserfc and cryptography are ~10 MB a process).
    from joserfc.errors import JoseError
    from joserfc.jwk import ECKey, RSAKey

    text = pem.reveal().encode()
    key: RSAKey | ECKey
    try:
        key = RSAKey.import_key(text)
    except (JoseError, ValueError, TypeError):
        try:
            key = ECKey.import_key(text)
        except (JoseError, ValueError, TypeError):
            raise ValueError("not a PEM RSA or EC private key") from None
    if not key.is_private:
        raise ValueError("a public key was given; the private key is needed to sign")
    if isinstance(key, RSAKey):
        fitting = "RS384"
        if key.raw_value.key_size < 2048:
            raise ValueError(f"RSA keys need at least 2048 bits, got {key.raw_value.key_size}")
    else:
        if key.curve_name != "P-384":
            raise ValueError(f"EC keys must use the curve P-384 for ES384, got {key.curve_name}")
        fitting = "ES384"
    if algorithm is not None and algorithm != fitting:
        kind = "an RSA" if fitting == "RS384" else "an EC P-384"
        raise ValueError(f"{algorithm} does not fit the key ({kind} key signs with {fitting})")
    return key, fitting

