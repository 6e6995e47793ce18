"""A local identity provider for tests: signing keys of the three algorithms the services accept,
and a real HTTP server on 127.0.0.1 publishing their public halves as a JWKS, as Auth0, Okta,
Cognito or Keycloak do at their `jwks_uri`.

The keys it publishes can change while it runs (a rotation), it counts the requests it gets, and
it can stop answering (an outage) or hold requests without answering (a provider that hangs).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
HANG_LIMIT_S = 30.0


@dataclass(frozen=True)
class SigningKey:
    """A provider's key pair: `kid` and algorithm as its tokens' header names them."""

    kid: str
    algorithm: str
    private_key: PrivateKey

    @classmethod
    def rsa(cls, kid: str, bits: int = 2048) -> SigningKey:
        return cls(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=bits))

    @classmethod
    def ec(cls, kid: str) -> SigningKey:
        return cls(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def ed25519(cls, kid: str) -> SigningKey:
        return cls(kid, "EdDSA", ed25519.Ed25519PrivateKey.generate())

    def jwk(self) -> dict[str, Any]:
        """The public key as a JWK, as a provider publishes it."""
        public = self.private_key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            fields = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            fields = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            fields = OKPAlgorithm.to_jwk(public, as_dict=True)
        return {**fields, "kid": self.kid, "alg": self.algorithm, "use": "sig"}

    def mint(self, claims: Mapping[str, Any], *, kid: str | None = None) -> str:
        return jwt.encode(dict(claims), self.private_key, algorithm=self.algorithm, headers={"kid": kid or self.kid})


def claims_for(
    subject: str, roles: list[str], *, issuer: str, audience: str, ttl_s: float = 3600, now_s: float | None = None
) -> dict[str, Any]:
    issued = int(time.time() if now_s is None else now_s)
    return {"sub": subject, "roles": roles, "iss": issuer, "aud": audience, "iat": issued, "exp": issued + int(ttl_s)}


class JwksServer:
    """`GET /.well-known/jwks.json` answers the published keys; anything else 404."""

    PATH = "/.well-known/jwks.json"

    def __init__(self, *keys: SigningKey) -> None:
        self._lock = threading.Lock()
        self._keys = list(keys)
        self.requests = 0
        self.hanging = False
        self._release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    server.requests += 1
                    body = json.dumps({"keys": [key.jwk() for key in server._keys]}).encode()
                    hanging = server.hanging
                if hanging:
                    server._release.wait(HANG_LIMIT_S)
                    return
                if self.path != JwksServer.PATH:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass  # quiet: the tests read the request count instead

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, name="jwks-server", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}{self.PATH}"

    def publish(self, *keys: SigningKey) -> None:
        """From now on the set holds exactly these keys."""
        with self._lock:
            self._keys = list(keys)

    def hang(self) -> None:
        """Accept requests and never answer them (until `stop`)."""
        with self._lock:
            self.hanging = True

    def stop(self) -> None:
        self._release.set()
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(10)
