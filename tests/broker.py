"""A real MQTT broker for tests: Debian's mosquitto on loopback, with three listeners.

- ``plain``: no TLS;
- ``tls``: server certificate signed by a throwaway CA;
- ``mtls``: the same, and a client certificate signed by that CA is required.

Certificates are made here with ``cryptography`` (a throwaway CA, the broker's certificate for
127.0.0.1 and localhost, a client certificate, and a client certificate from another CA that the
broker must refuse). The broker keeps QoS 1 messages for persistent sessions across restarts
(``restart()``), like a real one.
"""

from __future__ import annotations

import datetime as dt
import getpass
import ipaddress
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # signed by another CA: refused by the mtls listener
    stranger_key: Path


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, key, cert) -> None:
    from cryptography.hazmat.primitives import serialization

    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _cert(name: str, key, issuer_name, issuer_key, ca: bool = False, server: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def make_certs(folder: Path) -> Certs:
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = _cert("edgeloop test CA", ca_key, None, None, ca=True)
    _write(folder / "ca", ca_key, ca)
    for name, server in (("server", True), ("client", False)):
        key = _key()
        _write(folder / name, key, _cert(f"edgeloop test {name}", key, ca.subject, ca_key, server=server))
    other_key = _key()
    other = _cert("another CA", other_key, None, None, ca=True)
    key = _key()
    _write(folder / "stranger", key, _cert("stranger", key, other.subject, other_key))
    return Certs(folder / "ca.crt", folder / "server.crt", folder / "server.key", folder / "client.crt",
                 folder / "client.key", folder / "stranger.crt", folder / "stranger.key")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """mosquitto with ``plain``, ``tls`` and ``mtls`` listeners on loopback."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.certs = make_certs(folder / "certs")
        self.ports = {"plain": _free_port(), "tls": _free_port(), "mtls": _free_port()}
        self.proc: subprocess.Popen | None = None
        c = self.certs
        (folder / "mosquitto.conf").write_text(
            f"user {getpass.getuser()}\n"  # as root, mosquitto would drop to a user that cannot read tmp dirs
            "per_listener_settings true\n"
            f"persistence true\npersistence_location {folder}/\nautosave_interval 1\n"
            f"log_dest file {folder}/mosquitto.log\nlog_type error\nlog_type warning\nlog_type notice\n"
            f"listener {self.ports['plain']} 127.0.0.1\nallow_anonymous true\n"
            f"listener {self.ports['tls']} 127.0.0.1\nallow_anonymous true\n"
            f"cafile {c.ca}\ncertfile {c.server_cert}\nkeyfile {c.server_key}\n"
            f"listener {self.ports['mtls']} 127.0.0.1\nallow_anonymous true\n"
            f"cafile {c.ca}\ncertfile {c.server_cert}\nkeyfile {c.server_key}\n"
            "require_certificate true\n")

    @staticmethod
    def available() -> bool:
        return shutil.which("mosquitto") is not None or Path("/usr/sbin/mosquitto").exists()

    def start(self) -> Broker:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([exe, "-c", str(self.folder / "mosquitto.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        for port in self.ports.values():
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"mosquitto did not start: {self.log()[-2000:]}") from None
                    time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # mosquitto saves its persistence file on SIGTERM
            self.proc.wait(10)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def log(self) -> str:
        path = self.folder / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""
