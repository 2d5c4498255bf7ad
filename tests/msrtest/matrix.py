"""Matrix vocabulary the tests share: the test server name, the paths the filter routes, the
filter's fallback key, and a logged-in device / the registered application service."""

from __future__ import annotations

import dataclasses
import re

SERVER_NAME = "example.test"

SYNC_PATH = "/_matrix/client/v3/sync"
WHOAMI_PATH = "/_matrix/client/v3/account/whoami"  # the filter's default whoami_path
SLIDING_SYNC_PATH = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"
# The hash key the filter sets when it routes without a user: `~` and 16 hex digits.
FALLBACK_KEY = re.compile(r"^~[0-9a-f]{16}$")


@dataclasses.dataclass
class Device:
    user_id: str
    device_id: str
    token: str = dataclasses.field(repr=False)  # never printed

    @property
    def localpart(self) -> str:
        return self.user_id[1:].split(":", 1)[0]


@dataclasses.dataclass
class AppService:
    """The application service registered in the test Synapse (no URL: it receives nothing)."""

    id: str
    sender_localpart: str
    user_prefix: str  # exclusive user namespace: @<user_prefix>.*:SERVER_NAME
    as_token: str = dataclasses.field(repr=False)  # never printed
    hs_token: str = dataclasses.field(repr=False)

    @property
    def sender(self) -> str:
        return f"@{self.sender_localpart}:{SERVER_NAME}"

    def registration(self) -> dict:
        """The registration file's content (Synapse `app_service_config_files`)."""
        return {
            "id": self.id,
            "url": None,
            "as_token": self.as_token,
            "hs_token": self.hs_token,
            "sender_localpart": self.sender_localpart,
            "namespaces": {
                "users": [
                    {
                        "exclusive": True,
                        "regex": f"@{re.escape(self.user_prefix)}.*:{re.escape(SERVER_NAME)}",
                    }
                ],
                "aliases": [],
                "rooms": [],
            },
        }
