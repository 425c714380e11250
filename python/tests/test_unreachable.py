import socket

import pytest

import vmnet_broker as vb


def test_broker_not_running(tmp_path):
    path = str(tmp_path / "missing.sock")
    with pytest.raises(vb.BrokerUnreachable) as e:
        vb.acquire_network("shared", socket_path=path)
    assert e.value.code == vb.BROKER_UNREACHABLE == 1
    assert "broker not running at " + path in str(e.value)
    assert isinstance(e.value.__cause__, FileNotFoundError)


def test_stale_socket_is_not_running(tmp_path):
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)  # bound, never listening: what a crashed broker leaves behind
    try:
        with pytest.raises(vb.BrokerUnreachable, match="broker not running at " + path):
            vb.Client(path)
    finally:
        s.close()


def test_socket_path_from_environment(monkeypatch, tmp_path):
    path = str(tmp_path / "env.sock")
    monkeypatch.setenv(vb.SOCKET_ENV, path)
    assert vb.socket_path() == path
    with pytest.raises(vb.BrokerUnreachable, match=path):
        vb.Client()
    monkeypatch.setenv(vb.SOCKET_ENV, "")
    assert vb.socket_path() == vb.DEFAULT_SOCKET_PATH
