"""What `meshd doctor` reads on the host (meshd/doctor/facts.py)."""

from __future__ import annotations

import datetime
import fcntl
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from meshd.doctor import facts


def test_file_modes_lists_files_but_not_service_checkouts(tmp_path):
    d = tmp_path / "data"
    (d / "auth").mkdir(parents=True)
    (d / "runtime" / "checkouts").mkdir(parents=True)
    (d / "keyring.json").write_text("{}")
    os.chmod(d / "keyring.json", 0o644)
    (d / "auth" / "issuer.key").write_text("k")
    (d / "runtime" / "checkouts" / "main.py").write_text("x")
    os.chmod(d, 0o700)
    mode, files = facts.file_modes(d)
    assert mode is not None and mode & 0o777 == 0o700
    assert dict(files).keys() == {"keyring.json", os.path.join("auth", "issuer.key")}
    assert dict(files)["keyring.json"] & 0o777 == 0o644
    assert facts.file_modes(tmp_path / "missing") == (None, [])


def test_lock_holder_is_the_process_holding_the_lock(tmp_path):
    lock = tmp_path / facts.LOCK_FILE
    lock.write_text("4242")  # what is written does not matter: the kernel's table does
    assert facts.lock_holder(tmp_path) is None
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert facts.lock_holder(tmp_path) == os.getpid()
    finally:
        os.close(fd)
    assert facts.lock_holder(tmp_path) is None
    assert facts.lock_holder(tmp_path / "nowhere") is None
    os.remove(lock)
    os.mkfifo(lock)  # not a regular file: never opened (a FIFO would block)
    assert facts.lock_holder(tmp_path) is None


def fake_proc(root, pid: int, argv: list[str], environ: dict[str, str] | None = None,
              cwd: str = "/") -> None:
    p = root / str(pid)
    p.mkdir()
    (p / "cmdline").write_bytes(b"\0".join(w.encode() for w in argv) + b"\0")
    (p / "environ").write_bytes(b"\0".join(f"{k}={v}".encode()
                                           for k, v in (environ or {}).items()))
    os.symlink(cwd, p / "cwd")


def test_daemons_of_finds_meshd_up_processes_on_the_data_dir(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    fake_proc(proc, 10, ["/usr/bin/meshd", "up", "--data-dir", str(data)])
    fake_proc(proc, 11, ["python3", "-m", "meshd_cli", "up", f"--data-dir={data}"])
    fake_proc(proc, 12, ["/usr/bin/meshd", "up"], {"MESHD_DATA_DIR": str(data)})
    fake_proc(proc, 13, ["/usr/bin/meshd", "up", "--data-dir", "data"], cwd=str(tmp_path))
    fake_proc(proc, 20, ["/usr/bin/meshd", "up", "--data-dir", str(tmp_path / "other")])
    fake_proc(proc, 21, ["/usr/bin/meshd", "members", "--data-dir", str(data)])
    fake_proc(proc, 22, ["vim", "up", "--data-dir", str(data)])
    (proc / "self").mkdir()
    assert facts.daemons_of(data, proc) == [10, 11, 12, 13]


def certificate(path, days: int) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshd-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=30))
            .not_valid_after(now + datetime.timedelta(days=days)).sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(Encoding.PEM))


def test_certificate_days(tmp_path):
    certificate(tmp_path / "ok.pem", 90)
    days, why = facts.certificate_days(str(tmp_path / "ok.pem"))
    assert days is not None and 89 < days <= 90 and why == ""
    certificate(tmp_path / "old.pem", -2)
    days, _ = facts.certificate_days(str(tmp_path / "old.pem"))
    assert days is not None and -3 < days < -1
    (tmp_path / "bad.pem").write_text("not a certificate")
    assert facts.certificate_days(str(tmp_path / "bad.pem"))[0] is None
    assert "cannot read" in facts.certificate_days(str(tmp_path / "none.pem"))[1]
