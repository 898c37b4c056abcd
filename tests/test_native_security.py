"""The native-kernel cache never loads a library that someone other than the user could have written or
swapped (issue 12, item 6).

Each case plants an "attacker" library at the exact cache path the victim would load: a shared object whose
constructor creates a marker file, so running its code at all is detected. The victim is a fresh Python
process that loads the kernels; it must not run the planted constructor, must warn naming the path and the
reason, and must still end up with working kernels (built in a private directory) that pass their
self-check. Every case ran the attacker's constructor on the loader before this check existed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not hasattr(os, "getuid") or not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
    or not os.path.isdir("/proc/self/fd"),
    reason="needs POSIX permissions, /proc/self/fd and a C compiler")

EVIL_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *p = getenv("GS_EVIL_MARKER");
    FILE *f = fopen(p ? p : "/tmp/gs-evil-marker", "w");
    if (f) { fputs("attacker code ran\n", f); fclose(f); }
}
int gs_fwht_f32(void) { return 0; }
"""

VICTIM = r"""
import json, sys, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from gradsketch.sketch import _native
    if len(sys.argv) > 1 and sys.argv[1] == "swap":
        # the race of the issue, made deterministic: right after the library file is checked, replace it
        # at its path by the attacker's; the loader must load the file it checked, not what the path names now
        import os
        orig = _native._open_trusted_lib
        def swapping(dir_fd, name, where):
            fd = orig(dir_fd, name, where)
            os.replace(sys.argv[2], where)
            return fd
        _native._open_trusted_lib = swapping
    st = _native.status()
    import torch
    x = torch.randn(3, 64, dtype=torch.float64)
    ok = None
    if _native.library() is not None:
        from gradsketch.sketch._transforms import hadamard
        ok = bool(torch.allclose(_native.fwht_(x.clone(), 0.125), x @ hadamard(64, torch.float64), atol=1e-12))
print(json.dumps({"status": st, "warnings": [str(w.message) for w in caught], "kernel_ok": ok}))
"""


def _victim(cache: Path, marker: Path, *args: str) -> dict:
    env = dict(os.environ, GRADSKETCH_CACHE=str(cache), GS_EVIL_MARKER=str(marker))
    env.pop("GRADSKETCH_NATIVE", None)
    r = subprocess.run([sys.executable, "-c", VICTIM, *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def world():
    """A directory others can traverse (0755, under /tmp), the attacker's library in it (0644), and the
    file name the victim's cache uses (learnt from one clean build)."""
    base = Path(tempfile.mkdtemp(prefix="gs-native-sec-", dir="/tmp"))
    try:
        base.chmod(0o755)
        evil = base / "evil.so"
        (base / "evil.c").write_text(EVIL_C)
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        subprocess.run([cc, "-shared", "-fPIC", "-o", str(evil), str(base / "evil.c")], check=True)
        evil.chmod(0o644)
        clean = base / "clean-cache"
        res = _victim(clean, base / "marker-clean")
        assert res["status"]["state"] == "loaded" and res["kernel_ok"] is True, res
        assert not res["warnings"] and res["status"]["path"].startswith(str(clean)), res
        name = Path(res["status"]["path"]).name
        yield base, evil, name, clean
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _assert_refused(res: dict, marker: Path, path_part: str, reason: str) -> None:
    assert not marker.exists(), "the planted library's constructor ran"
    ws = [w for w in res["warnings"] if "not loading the cached native kernels" in w]
    assert ws, res
    assert path_part in ws[0] and reason in ws[0], ws[0]
    # still usable: built privately, loaded through its descriptor, self-checked, and correct
    assert res["status"]["state"] == "loaded", res
    assert "private build" in res["status"]["path"], res
    assert res["kernel_ok"] is True


def test_normal_path_loads_the_cache_and_passes_its_self_check(world, tmp_path):
    base, _, name, cache = world  # the fixture's first, clean build: it loaded from the cache, no warning
    st = (cache / name).stat()
    assert st.st_uid == os.getuid() and (st.st_mode & 0o077) == 0  # written 0600
    second = _victim(cache, tmp_path / "m")  # loads the cached file: same inode, nothing rebuilt, no warning
    assert second["status"]["path"] == str(cache / name) and not second["warnings"]
    assert (cache / name).stat().st_ino == st.st_ino and second["kernel_ok"] is True


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv for a second uid")
def test_library_planted_by_another_uid_is_refused(world):
    base, evil, name, _ = world
    cache = base / "cache-foreign"
    cache.mkdir(mode=0o700)
    cache.chmod(0o777)  # open for a moment so that uid 12345 can plant its file...
    subprocess.run(["setpriv", "--reuid=12345", "--regid=12345", "--clear-groups", "cp", str(evil),
                    str(cache / name)], check=True)
    cache.chmod(0o700)  # ...then private again: only the file's owner is wrong now
    assert (cache / name).stat().st_uid == 12345
    marker = base / "marker-foreign"
    _assert_refused(_victim(cache, marker), marker, str(cache / name), "owned by uid 12345")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory to another uid")
def test_cache_directory_of_another_uid_is_refused(world):
    base, evil, name, _ = world
    cache = base / "cache-dir-foreign"
    cache.mkdir(mode=0o700)
    shutil.copy(evil, cache / name)
    os.chown(cache, 12345, 12345)
    marker = base / "marker-dir-foreign"
    _assert_refused(_victim(cache, marker), marker, str(cache), "owned by uid 12345")


def test_world_writable_library_in_a_0755_directory_is_refused(world):
    base, evil, name, _ = world
    cache = base / "cache-0666"
    cache.mkdir()
    cache.chmod(0o755)
    shutil.copy(evil, cache / name)
    (cache / name).chmod(0o666)
    marker = base / "marker-0666"
    _assert_refused(_victim(cache, marker), marker, str(cache / name), "writable by its group or by others (mode 0666)")


def test_symlinked_library_is_refused(world):
    base, evil, name, _ = world
    cache = base / "cache-link"
    cache.mkdir(mode=0o700)
    target = base / "mine.so"
    shutil.copy(evil, target)
    target.chmod(0o600)  # even a file of this user's: the path is not the file that would be checked
    (cache / name).symlink_to(target)
    marker = base / "marker-link"
    _assert_refused(_victim(cache, marker), marker, str(cache / name), "symbolic link")


@pytest.mark.parametrize("mode", [0o777, 0o770])
def test_parent_writable_by_others_is_refused(world, mode):
    base, evil, name, _ = world
    parent = base / f"open-{mode:o}"
    cache = parent / "cache"
    cache.mkdir(parents=True, mode=0o700)
    parent.chmod(mode)  # no sticky bit: whoever can write here can rename `cache` away and put theirs
    shutil.copy(evil, cache / name)
    (cache / name).chmod(0o600)
    marker = base / f"marker-parent-{mode:o}"
    _assert_refused(_victim(cache, marker), marker, str(parent), f"mode {mode:04o}")


def test_file_swapped_between_check_and_load_is_not_loaded(world, tmp_path):
    base, evil, name, clean = world
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    shutil.copy(clean / name, cache / name)  # a good cached library
    swap_in = tmp_path / "swap.so"
    shutil.copy(evil, swap_in)
    marker = tmp_path / "marker-swap"
    res = _victim(cache, marker, "swap", str(swap_in))
    assert (cache / name).read_bytes() == evil.read_bytes()  # the swap happened
    assert not marker.exists(), "the library swapped in after the check was loaded"
    assert res["status"]["state"] == "loaded" and res["kernel_ok"] is True, res
