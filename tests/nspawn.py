"""A Debian bookworm container booted with ``systemd-nspawn``, for running the shipped units under a real systemd.

The host has no systemd as PID 1, so the container is started with ``--register=no --keep-unit`` and driven with
``nsenter -t <its PID 1> -a``, not machinectl. It shares the host's network: a server the test starts on 127.0.0.1
is reachable from inside.

The root file system is made once by ``debootstrap`` (about a minute) and cached under
``$MMWATCHD_NSPAWN_CACHE`` (default ``/var/cache/mmwatchd-test``) in a folder named after a hash of everything that
goes into it; every test run boots a copy of it, so what one run installs never leaks into the next. pip's cache
lives beside it and is bound into the container (it saves downloads where the index's answers may be cached). When
the host's pip trusts its own CA bundle (``$PIP_CERT`` or ``/etc/pip.conf``: a proxy that inspects HTTPS), the
container's pip is given the same bundle, since ``pip install .`` inside reaches PyPI through the host's network.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

SUITE = "bookworm"
#: What the rootfs holds beyond debootstrap's minbase: systemd as init (libpam-systemd: user managers, for the user
#: unit), and what the README's install steps use.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "libpam-systemd", "python3", "python3-venv", "acl")
#: Changing what ``build_rootfs`` does changes this, and with it the cache key.
ROOTFS_RECIPE = 2
DEFAULT_MIRROR = "http://deb.debian.org/debian"
TOOLS = ("debootstrap", "systemd-nspawn", "nsenter")


def cache_root() -> Path:
    return Path(os.environ.get("MMWATCHD_NSPAWN_CACHE") or "/var/cache/mmwatchd-test")


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def host_mirror(sources: Path = Path("/etc/apt/sources.list.d/debian.sources")) -> str:
    """The Debian mirror the host's apt uses (deb822 ``URIs:`` of the stanza whose suites include bookworm)."""
    try:
        text = sources.read_text()
    except OSError:
        return DEFAULT_MIRROR
    for stanza in re.split(r"\n\s*\n", text):
        fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, flags=re.M))
        if SUITE in fields.get("Suites", "").split() and fields.get("URIs"):
            return fields["URIs"].split()[0]
    return DEFAULT_MIRROR


def rootfs(log: Path) -> Path:
    """The cached rootfs for this package list and mirror, built first when missing (``log`` gets debootstrap's
    output). Builds are serialised with a lock, and a finished build is renamed into place, so a killed build is
    never taken for a finished one."""
    mirror = host_mirror()
    key = hashlib.sha256(json.dumps([ROOTFS_RECIPE, SUITE, mirror, PACKAGES]).encode()).hexdigest()[:16]
    base = cache_root() / "rootfs"
    done = base / key
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.is_dir():
            return done
        partial = Path(tempfile.mkdtemp(prefix=f"{key}.partial-", dir=base))
        partial.chmod(0o755)  # the container's "/": mkdtemp's 0700 would lock every user but root out of everything
        try:
            with open(log, "ab") as out:
                subprocess.run(
                    ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(partial),
                     mirror],
                    stdout=out, stderr=subprocess.STDOUT, check=True, timeout=1200,
                )  # fmt: skip
            # A machine-id is made at each boot (the copy's /etc/machine-id is empty: "uninitialized").
            (partial / "etc" / "machine-id").write_text("")
            partial.rename(done)
        finally:
            if partial.exists():
                shutil.rmtree(partial, ignore_errors=True)
        return done


def host_pip_cert() -> Path | None:
    """The CA bundle the host's pip is told to trust ($PIP_CERT or /etc/pip.conf), when there is one: a network
    whose HTTPS goes through a proxy with its own CA needs it inside the container too."""
    import configparser

    cert = os.environ.get("PIP_CERT")
    if not cert:
        conf = configparser.ConfigParser()
        with contextlib.suppress(configparser.Error):
            conf.read("/etc/pip.conf")
        cert = conf.get("global", "cert", fallback=None)
    return Path(cert) if cert and Path(cert).is_file() else None


class Container:
    """A booted copy of the rootfs. ``root`` is its file system as seen from the host."""

    def __init__(self, work: Path, image: Path) -> None:
        self.work = work
        self.root = work / "rootfs"
        self.name = f"mmwatchd-test-{os.getpid()}"
        self.console = work / "console.log"
        subprocess.run(["cp", "-a", "--reflink=auto", str(image), str(self.root)], check=True, timeout=300)
        cert = host_pip_cert()
        if cert is not None:
            shutil.copyfile(cert, self.root / "etc" / "ssl" / "host-pip-ca.crt")
            (self.root / "etc" / "pip.conf").write_text("[global]\ncert = /etc/ssl/host-pip-ca.crt\n")
        pip_cache = cache_root() / "pip"
        pip_cache.mkdir(parents=True, exist_ok=True)
        with open(self.console, "ab") as out:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "--boot", "--register=no", "--keep-unit", "--console=read-only",
                 f"--machine={self.name}", f"--bind={pip_cache}:/root/.cache/pip", "-D", str(self.root)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.pid1 = 0
        try:
            self.pid1 = self._wait_for_init()
            self._wait_booted()
        except BaseException:
            self.close()
            raise

    def _wait_for_init(self, timeout: float = 30.0) -> int:
        """The container's PID 1 as the host sees it: nspawn's child."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited with {self.nspawn.returncode}: {self.console_tail()}")
            with contextlib.suppress(OSError):
                children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children").read_text().split()
                for child in children:
                    status = Path(f"/proc/{child}/status").read_text()
                    if re.search(r"^NSpid:.*\s1$", status, flags=re.M):
                        return int(child)
            time.sleep(0.05)
        raise RuntimeError(f"no container init within {timeout} s: {self.console_tail()}")

    def _wait_booted(self, timeout: float = 120.0) -> None:
        """Until systemd says the boot is over. systemctl is first called once systemd's private socket exists:
        earlier, it falls back to D-Bus, and a bus activation of systemd during the boot stalls dbus.service."""
        deadline = time.monotonic() + timeout
        private = Path(f"/proc/{self.pid1}/root/run/systemd/private")
        state = "no /run/systemd/private"
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                break
            if private.exists():
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the container did not boot ({state!r}): {self.console_tail()}")

    def console_tail(self, n: int = 4000) -> str:
        try:
            return self.console.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # -- inside --------------------------------------------------------------------------------------------------

    def run(self, *argv: str, check: bool = True, timeout: float = 60.0, user: str | None = None,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """``argv`` inside the container, as from a login shell's clean environment (root, or ``user``, whose
        ``$XDG_RUNTIME_DIR`` is set as a login sets it, so that ``systemctl --user`` finds the user manager)."""
        env = ["env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8",
               "HOME=/root", "TERM=dumb", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0"]  # fmt: skip
        if user is not None:
            uid = int(self.sh(f"id -u {user}").stdout)
            env = ["setpriv", "--reuid", user, "--regid", user, "--init-groups", *env,
                   f"XDG_RUNTIME_DIR=/run/user/{uid}"]  # fmt: skip
            env[env.index("HOME=/root")] = f"HOME=/home/{user}"
        done = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", *env, *argv], input=stdin,
                              capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def sh(self, script: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run("bash", "-euo", "pipefail", "-c", script, **kw)  # type: ignore[arg-type]

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show`` properties of ``unit``."""
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, *, since_cursor: str | None = None) -> str:
        """The unit's journal messages (the service's own lines and systemd's about it)."""
        argv = ["journalctl", "-u", unit, "-o", "cat", "--no-pager"]
        if since_cursor:
            argv.append(f"--after-cursor={since_cursor}")
        return self.run(*argv).stdout

    def journal_cursor(self) -> str:
        out = self.run("journalctl", "-n", "1", "-o", "export", "--no-pager").stdout
        match = re.search(r"^__CURSOR=(.*)$", out, flags=re.M)
        return match.group(1) if match else ""

    # -- teardown ------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Power the container off and wait for nspawn; stop it by signal if it will not go; remove the copy."""
        if self.nspawn.poll() is None:
            if self.pid1 > 1:
                with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                    subprocess.run(["nsenter", "-t", str(self.pid1), "-a", "systemctl", "poweroff"], timeout=30,
                                   capture_output=True, check=False)  # fmt: skip
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None and self.nspawn.poll() is None:
                    self.nspawn.send_signal(sig)  # SIGTERM: nspawn asks the container's init to power off
                    if sig == signal.SIGKILL and self.pid1 > 1:  # nspawn cannot take its container along:
                        with contextlib.suppress(ProcessLookupError):  # end the pid namespace
                            os.kill(self.pid1, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.nspawn.wait(timeout=30)
                    break
        # nspawn leaves its (empty) mount-propagation folder behind when it is not run by systemd.
        with contextlib.suppress(OSError):
            Path("/run/systemd/nspawn/propagate", self.name).rmdir()
        shutil.rmtree(self.work, ignore_errors=True)
