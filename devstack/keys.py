"""Development keys and tokens for `make run`: one Ed25519 key pair kept under the data dir, and
ready-to-use tokens for a demo client, therapist and admin (docs/security.md, "Development").

Production never uses this: there the public keys come from configuration and tokens from the
identity provider.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from service_kit.auth import ADMIN, CLIENT, THERAPIST, mint_token, private_pem, public_pem

ISSUER = "therapy-booking-dev"
AUDIENCE = "therapy-booking"
DEMO_TOKEN_TTL_S = 24 * 3600
# Fixed ids, so that README's examples work with the printed tokens ($OWNER is the demo client).
DEMO_CLIENT_ID = "3f2b8c1e-7d4a-4b7e-9a55-0c1d2e3f4a5b"
DEMO_THERAPIST_ID = "5d0c6a2e-2b1f-4c3d-8e7f-1a2b3c4d5e6f"
DEMO_ADMIN_ID = "9e8d7c6b-5a49-4382-9170-6f5e4d3c2b1a"


@dataclass(frozen=True)
class DevKeys:
    private_key_file: Path
    public_key_file: Path

    def private_key(self) -> Ed25519PrivateKey:
        key = serialization.load_pem_private_key(self.private_key_file.read_bytes(), password=None)
        assert isinstance(key, Ed25519PrivateKey)
        return key

    def environment(self) -> dict[str, str]:
        """What both services need to trust these keys, and booking to mint its own token."""
        return {
            "AUTH_JWT_PUBLIC_KEY_FILE": str(self.public_key_file),
            "AUTH_JWT_ISSUER": ISSUER,
            "AUTH_JWT_AUDIENCE": AUDIENCE,
            "BOOKING_SERVICE_TOKEN_PRIVATE_KEY_FILE": str(self.private_key_file),
        }

    def demo_tokens(self) -> dict[str, str]:
        """24-hour tokens by role: CLIENT_TOKEN, THERAPIST_TOKEN, ADMIN_TOKEN."""
        key = self.private_key()
        subjects = {CLIENT: DEMO_CLIENT_ID, THERAPIST: DEMO_THERAPIST_ID, ADMIN: DEMO_ADMIN_ID}
        return {
            f"{role.upper()}_TOKEN": mint_token(
                key, subject=subject, roles=[role], issuer=ISSUER, audience=AUDIENCE, ttl_s=DEMO_TOKEN_TTL_S
            )
            for role, subject in subjects.items()
        }


def ensure_dev_keys(data_dir: Path) -> DevKeys:
    """The key pair under `data_dir/auth`, made on first use and kept across runs."""
    folder = data_dir / "auth"
    keys = DevKeys(folder / "signing-key.pem", folder / "public-keys.pem")
    if not keys.private_key_file.exists():
        folder.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        # Readable by the owner only, from its first byte.
        descriptor = os.open(keys.private_key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(private_pem(key))
        keys.public_key_file.write_text(public_pem(key))
    elif not keys.public_key_file.exists():
        keys.public_key_file.write_text(public_pem(keys.private_key()))
    return keys
