"""`meshd up --print-systemd-unit`: a hardened systemd unit that runs this `meshd up`.

Rules:
- The daemon runs as its own unprivileged user (`User=`, created by the operator or by
  `DynamicUser` when asked), with its data dir as the unit's StateDirectory (0700), and
  nothing else writable (`ProtectSystem=strict`, `ProtectHome`, `PrivateTmp`).
- No privileges: `NoNewPrivileges`, an empty capability bounding set (meshd's default ports
  are above 1024; a port below needs `CAP_NET_BIND_SERVICE`, which the operator adds), no
  kernel tunables, modules or cgroups, native system calls only, sockets of the kinds meshd
  uses (unix, IPv4, IPv6, netlink for the interfaces).
- Restarted on failure with a pause; secrets come from an EnvironmentFile the operator
  writes (MESHD_SECRET), never from the command line that `ps` shows.
- ExecStart is the command given, each word in double quotes with systemd's escapes (`\\`,
  `\"`, `%%` for its specifiers, `$$` for its variable expansion), so a value cannot add a
  word, a directive or a secret from the environment; a word with a control character (a
  newline would start a directive) is refused (UnitError).
"""

from __future__ import annotations

from collections.abc import Sequence

DATA_DIR = "/var/lib/meshd"
ENV_FILE = "/etc/meshd/meshd.env"


class UnitError(ValueError):
    """A value that cannot go into a unit."""


def quote(word: str) -> str:
    """One ExecStart word as systemd reads it back, exactly."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in word):
        raise UnitError(f"{word!r} holds a control character: it cannot go into a unit")
    escaped = (word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
               .replace("$", "$$"))
    plain = escaped == word and bool(word) and all(c.isalnum() or c in "/._-=:,@+" for c in word)
    return word if plain else f'"{escaped}"'


def unit(command: Sequence[str], user: str = "meshd", data_dir: str = DATA_DIR) -> str:
    """The unit's text; `command` is the full `meshd up ...` to run."""
    if not data_dir.startswith("/"):
        raise UnitError(f"the data dir {data_dir!r} must be an absolute path")
    state = data_dir.removeprefix("/var/lib/") if data_dir.startswith("/var/lib/") else ""
    if state and not all(c.isalnum() or c in "._-/" for c in state):
        state = ""  # StateDirectory takes a plain relative path; anything else: ReadWrite
    where = (f"StateDirectory={state}\nStateDirectoryMode=0700\n" if state else
             f"ReadWritePaths={quote(data_dir)}\n")
    if not user or not all(c.isalnum() or c in "-_" for c in user):
        raise UnitError(f"{user!r} is not a user name")
    return f"""[Unit]
Description=meshd, the mesh daemon (one per host)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={user}
Group={user}
ExecStart={" ".join(quote(w) for w in command)}
EnvironmentFile=-{ENV_FILE}
Restart=on-failure
RestartSec=2s
TimeoutStopSec=30s
KillSignal=SIGTERM
{where}UMask=0077
LimitNOFILE=65536

NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""
