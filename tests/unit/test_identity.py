import stat

from agora.membership.identity import ensure_identity


def test_new_key_is_private_and_stable(tmp_path):
    path = ensure_identity(tmp_path / "keys" / "private_gpu0.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    content = path.read_bytes()
    assert len(content) > 100
    assert ensure_identity(path).read_bytes() == content, "an existing identity must never be replaced"


def test_loose_permissions_are_tightened(tmp_path):
    path = ensure_identity(tmp_path / "k.key")
    path.chmod(0o644)
    ensure_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
