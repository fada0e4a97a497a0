"""SPIFFE workload identities (`spiffe://<trust domain>/ns/<namespace>/sa/<service
account>`) and the CA's error type. Pure, no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NoReturn

TRUST_DOMAIN_PATTERN = re.compile(r"^[a-z0-9._-]{1,255}$")
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class CAError(Exception):
    """The CA cannot load, create or issue (bad files, bad request). The message says why."""


def fail(message: str) -> NoReturn:
    raise CAError(message)


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """`spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        if not TRUST_DOMAIN_PATTERN.match(self.trust_domain):
            fail(f"invalid trust domain {self.trust_domain!r}")
        for what, value in (("namespace", self.namespace), ("service account", self.service_account)):
            if not _K8S_NAME.match(value):
                fail(f"invalid {what} {value!r} in SPIFFE identity")

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        m = re.fullmatch(r"spiffe://([^/]+)/ns/([^/]+)/sa/([^/]+)", uri)
        if m is None:
            fail(f"{uri!r} is not a SPIFFE workload identity (spiffe://<trust domain>/ns/<ns>/sa/<sa>)")
        return cls(m.group(1), m.group(2), m.group(3))

    def __str__(self) -> str:
        return self.uri
