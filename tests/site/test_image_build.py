"""A real diskimage-builder build of a small node image: the base element, the serving element and one
framework runtime (MXNet, the smallest), as a root tarball (``-f tar``: no loop device needed). The
runtime must be where the control plane looks for it (the local driver's NAME-HASH folder, complete) and
import its framework inside the image's own root."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from cloudml_os.runtimes import COMPLETE_MARKER, runtime_dirname
from tests.site.ansible_runner import REPOSITORY, ensure_tool_venv
from tests.site.host import LOCAL_CA_FOLDER

DIB_VENV = Path.home() / ".cache" / "cloudml-os" / "diskimage-builder"
RUNTIME = "mxnet-1.9"


def ensure_dib_venv() -> Path:
    return ensure_tool_venv(DIB_VENV, REPOSITORY / "images" / "requirements.txt")


def test_node_image_build_holds_the_hardened_base_and_the_local_drivers_runtime(tmp_path: Path):
    venv = ensure_dib_venv()
    environment = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "DIB_NO_TMPFS": "1",
                   # Keep the debootstrap'ed base (and, by default, downloaded .debs) in ~/.cache/image-create.
                   "DIB_DEBOOTSTRAP_CACHE": "1"}
    if list(LOCAL_CA_FOLDER.glob("*.crt")):
        # This machine's own CAs (its egress proxy may inspect TLS), as a site gives its own.
        environment["DIB_CLOUDML_OS_CA_CERTIFICATES"] = str(LOCAL_CA_FOLDER)
    result = subprocess.run([str(REPOSITORY / "images" / "build.sh"), "-o", str(tmp_path), "-f", "tar",
                             "-e", "cloudml-os-mxnet", "-e", "cloudml-os-serving", "cloudml-os-base"],
                            capture_output=True, text=True, env=environment, timeout=3600)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]

    root = tmp_path / "root"
    root.mkdir()
    try:
        with tarfile.open(tmp_path / "cloudml-os-base.tar") as tar:
            tar.extractall(root, filter="fully_trusted")
        runtime = root / "opt" / "cloudml-os" / "runtimes" / runtime_dirname(RUNTIME)
        assert (runtime / COMPLETE_MARKER).exists()
        imported = subprocess.run(["chroot", str(root), f"/opt/cloudml-os/runtimes/{runtime.name}/bin/python", "-c",
                                   "import mxnet; print(mxnet.__version__)"], capture_output=True, text=True)
        assert imported.stdout.strip() == "1.9.1", imported.stderr[-2000:]

        sshd = (root / "etc" / "ssh" / "sshd_config.d" / "50-cloudml-os.conf").read_text()
        assert "PasswordAuthentication no" in sshd and "PermitRootLogin no" in sshd
        assert not list((root / "etc" / "ssh").glob("ssh_host_*")), "host keys must be made at first boot"
        cloud_config = (root / "etc" / "cloud" / "cloud.cfg.d" / "50-cloudml-os.cfg").read_text()
        assert "name: cloudml" in cloud_config and "sudo: false" in cloud_config
        assert (root / "opt" / "cloudml-os" / "serving" / "model_server.py").read_bytes() == (
            REPOSITORY / "cloudml_os" / "serving" / "runtime" / "model_server.py").read_bytes()
        assert oct((root / "var" / "lib" / "cloudml-os").stat().st_mode & 0o7777) == "0o1777"
    finally:  # the image and its unpacked root are gigabytes: not left in pytest's kept temporary folders
        shutil.rmtree(root)
        (tmp_path / "cloudml-os-base.tar").unlink()
