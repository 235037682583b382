"""One structured error for every process boundary (control API, RPC, CLI, gateway).

Rules:
- An error has `id` (who raised it, e.g. "meshd.control"), `code` (a short word such as
  "not_found"), `detail` (one human sentence) and `status` (HTTP-like number).
- It crosses boundaries as a plain map; tracebacks never do.
- The CLI prints it as one line: "<status> <code>: <detail>".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    408: "timeout",
    409: "conflict",
    429: "too_many_requests",
    500: "internal",
    503: "unavailable",
}


@dataclass
class MeshError(Exception):
    status: int
    detail: str
    code: str = ""
    id: str = "meshd"

    def __post_init__(self) -> None:
        if not self.code:
            self.code = STATUS_CODES.get(self.status, "error")
        Exception.__init__(self, self.detail)

    def __str__(self) -> str:
        return f"{self.status} {self.code.replace('_', ' ')}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "code": self.code, "detail": self.detail, "status": self.status}

    @classmethod
    def from_dict(cls, data: Any) -> MeshError:
        if not isinstance(data, dict):
            return cls(500, "malformed error from the daemon")
        status = data.get("status")
        return cls(
            status=status if isinstance(status, int) else 500,
            detail=str(data.get("detail", "unknown error")),
            code=str(data.get("code", "")),
            id=str(data.get("id", "meshd")),
        )


def bad_request(detail: str, id: str = "meshd") -> MeshError:
    return MeshError(400, detail, id=id)


def not_found(detail: str, id: str = "meshd") -> MeshError:
    return MeshError(404, detail, id=id)


def unavailable(detail: str, id: str = "meshd") -> MeshError:
    return MeshError(503, detail, id=id)


def too_many(detail: str, id: str = "meshd") -> MeshError:
    """429: the caller holds or asks too much at once; the detail says what to wait for."""
    return MeshError(429, detail, id=id)
