"""The listener kinds beyond plain MQTT, against the real binary with clients we did not write
(mosquitto_pub/mosquitto_sub and paho-mqtt): `mqtts` with certificates made by openssl at test
time, mutual TLS (`client_ca`), `use_identity_as_username`, `ws` and `wss` with paho's
websocket transport, `mount_point`, and certificates reloaded by SIGHUP while connections stay
up."""

import base64
import os
import socket
import ssl
import subprocess
import tempfile
import time

import pytest

from brokers import Outpost
from test_acl import Client

TIMEOUT = 10


def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(d, name):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{d}/{name}.key", "-out", f"{d}/{name}.pem", "-days", "2",
            "-subj", f"/O=outpost tests/CN={name}")


def make_cert(d, ca, name, cn, usage):
    """A certificate for `cn` signed by `ca`; `usage` is serverAuth or clientAuth."""
    with open(f"{d}/{name}.ext", "w") as f:
        f.write("basicConstraints=CA:FALSE\n"
                f"extendedKeyUsage={usage}\n"
                "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{d}/{name}.key", "-out", f"{d}/{name}.csr",
            "-subj", f"/O=outpost tests/CN={cn}")
    openssl("x509", "-req", "-in", f"{d}/{name}.csr", "-CA", f"{d}/{ca}.pem", "-CAkey",
            f"{d}/{ca}.key", "-CAcreateserial", "-out", f"{d}/{name}.pem", "-days", "2",
            "-extfile", f"{d}/{name}.ext")


def pki(d):
    make_ca(d, "ca")
    make_ca(d, "rogue")
    make_cert(d, "ca", "server", "localhost", "serverAuth")
    make_cert(d, "ca", "alice", "alice", "clientAuth")
    make_cert(d, "rogue", "mallory", "alice", "clientAuth")


def tls_listener(d, kind, extra=""):
    return f"""
[[listener]]
kind = "{kind}"
bind = "127.0.0.1:0"
cert_file = "{d}/server.pem"
key_file = "{d}/server.key"
{extra}"""


def config(d):
    return f"""
[gateway]
id = "tls"
data_dir = "{d}/data"
sys_interval = "0s"

[auth]
password_file = "{d}/passwd"
acl_file = "{d}/acl"

[[listener]]
kind = "mqtt"
bind = "127.0.0.1:0"
""" + tls_listener(d, "mqtts") + tls_listener(d, "mqtts", f'client_ca = "{d}/ca.pem"') \
        + tls_listener(d, "mqtts", f'client_ca = "{d}/ca.pem"\nuse_identity_as_username = true') \
        + """
[[listener]]
kind = "ws"
bind = "127.0.0.1:0"
""" + tls_listener(d, "wss") + """
[[listener]]
kind = "mqtt"
bind = "127.0.0.1:0"
mount_point = "site1/"
"""


ACL = """\
topic readwrite #
user bob
topic readwrite #
user alice
topic readwrite alice/#
"""


class Site:
    def __init__(self, d):
        self.d = d
        pki(d)
        with open(f"{d}/acl", "w") as f:
            f.write(ACL)
        subprocess.run(["mosquitto_passwd", "-c", "-b", f"{d}/passwd", "bob", "b-pass"],
                       check=True, capture_output=True)
        self.o = Outpost(d, config(d))
        self.plain, self.mounted = self.o.ports()
        self.mqtts, self.mutual, self.identity = self.o.ports(" over TLS")
        (self.ws,) = self.o.ports(" over WebSocket")
        (self.wss,) = self.o.ports(" over WebSocket and TLS")


@pytest.fixture(scope="module")
def site():
    with tempfile.TemporaryDirectory() as d:
        s = Site(d)
        yield s
        s.o.stop()


# CONNECT, MQTT 3.1.1, clean session, keep-alive 30 s, client id "x".
CONNECT = b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x1e\x00\x01x"


def refused_handshake(port, ca, cert=None):
    """Why a TLS client cannot get a CONNACK, or None if it can. Under TLS 1.3 a client
    certificate is judged after the client's handshake is done, so the refusal may only show
    when the first bytes are read."""
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(f"{cert}.pem", f"{cert}.key")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(CONNECT)
                if s.recv(4)[:1] == b"\x20":
                    return None
                return "closed without a CONNACK"
    except (ssl.SSLError, OSError) as e:
        return e


def sub_proc(port, topic, *tls):
    return subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-t", topic,
                             "-q", "1", "-C", "1", "-W", str(TIMEOUT), "-v", *tls],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def pub_cmd(port, topic, msg, *tls):
    return subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", topic,
                           "-q", "1", "-m", msg, *tls], capture_output=True, text=True,
                          timeout=TIMEOUT)


def test_mqtts_with_mosquitto_clients(site):
    d = site.d
    tls = ["--cafile", f"{d}/ca.pem"]
    sub = sub_proc(site.mqtts, "t/tls", *tls)
    time.sleep(0.5)
    r = pub_cmd(site.mqtts, "t/tls", "over-tls", *tls)
    assert r.returncode == 0, r.stderr
    out, err = sub.communicate(timeout=TIMEOUT + 5)
    assert out.strip() == "t/tls over-tls", err
    # A client that does not trust our CA never gets to MQTT.
    r = pub_cmd(site.mqtts, "t/tls", "x", "--cafile", f"{d}/rogue.pem")
    assert r.returncode != 0
    # Plain MQTT on the TLS port is not understood either.
    r = pub_cmd(site.mqtts, "t/tls", "x")
    assert r.returncode != 0


@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5.0"])
def test_mqtts_with_paho_meets_plain_tcp(site, v5):
    ca = f"{site.d}/ca.pem"
    t = Client(site.mqtts, f"tls-{v5}", v5, ca=ca)
    assert not t.rc.is_failure
    plain = Client(site.plain, f"plain-{v5}", v5)
    assert t.sub("cross/#") == [1]
    assert plain.sub("cross/#") == [1]
    plain.pub("cross/1", "from-tcp")
    t.pub("cross/2", "from-tls")
    assert t.topics() == [("cross/1", "from-tcp"), ("cross/2", "from-tls")]
    assert plain.topics(0.1) == [("cross/1", "from-tcp"), ("cross/2", "from-tls")]
    t.close()
    plain.close()


def test_mutual_tls(site):
    d = site.d
    ca = f"{d}/ca.pem"
    # Without a certificate, or with one our client CA did not sign: no handshake.
    assert refused_handshake(site.mutual, ca) is not None
    assert refused_handshake(site.mutual, ca, f"{d}/mallory") is not None
    # With one it did, the client is in; it still logs in as usual (anonymous here).
    c = Client(site.mutual, "mutual", ca=ca, cert=f"{d}/alice")
    assert not c.rc.is_failure
    assert c.sub("m/#") == [1]
    c.pub("m/1", "hello")
    assert c.topics() == [("m/1", "hello")]
    c.close()
    # mosquitto_sub with a client certificate.
    tls = ["--cafile", ca, "--cert", f"{d}/alice.pem", "--key", f"{d}/alice.key"]
    sub = sub_proc(site.mutual, "m/2", *tls)
    time.sleep(0.5)
    assert pub_cmd(site.mutual, "m/2", "mutual", *tls).returncode == 0
    out, err = sub.communicate(timeout=TIMEOUT + 5)
    assert out.strip() == "m/2 mutual", err
    r = pub_cmd(site.mutual, "m/2", "x", "--cafile", ca)
    assert r.returncode != 0
    site.o.wait_log(r"TLS handshake failed")


@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5.0"])
def test_identity_is_the_user_name(site, v5):
    d = site.d
    ca = f"{d}/ca.pem"
    # The certificate says CN=alice; the user name and password sent are ignored (bob's
    # password would not match "alice" in the password file anyway).
    c = Client(site.identity, f"id-{v5}", v5, user="bob", password="wrong", ca=ca,
               cert=f"{d}/alice")
    assert not c.rc.is_failure
    watcher = Client(site.plain, f"watch-{v5}", v5, user="bob", password="b-pass")
    assert watcher.sub("#") == [1]
    # The ACL gives alice only alice/#.
    ok = c.pub("alice/1", "mine")
    denied = c.pub("other/1", "not-mine")
    if v5:
        assert (ok, denied) == (0, 0x87)
    assert watcher.topics() == [("alice/1", "mine")]
    assert c.sub("other/#") == [0x87 if v5 else 0x80]
    c.close()
    watcher.close()


@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5.0"])
@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
def test_websocket_with_paho(site, v5, tls):
    port = site.wss if tls else site.ws
    ca = f"{site.d}/ca.pem" if tls else None
    w = Client(port, f"ws-{v5}-{tls}", v5, ca=ca, transport="websockets")
    assert not w.rc.is_failure
    plain = Client(site.plain, f"wsplain-{v5}-{tls}", v5)
    assert w.sub("web/#") == [1]
    plain.pub("web/1", "to-browser")
    # A payload larger than one TCP segment, to cross WebSocket frames.
    big = "x" * 200_000
    w.pub("web/2", big)
    assert w.topics() == [("web/1", "to-browser"), ("web/2", big)]
    w.close()
    plain.close()


def test_websocket_subprotocol(site):
    """The handshake answers `mqtt`, and refuses a client that offers only something else."""
    def handshake(protocols):
        key = base64.b64encode(os.urandom(16)).decode()
        req = (f"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocols}\r\n\r\n")
        with socket.create_connection(("127.0.0.1", site.ws), timeout=TIMEOUT) as s:
            s.sendall(req.encode())
            return s.recv(4096).decode(errors="replace")
    ok = handshake("mqtt")
    assert ok.startswith("HTTP/1.1 101"), ok
    assert "sec-websocket-protocol: mqtt" in ok.lower()
    bad = handshake("chat")
    assert bad.startswith("HTTP/1.1 400"), bad


@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5.0"])
def test_mount_point(site, v5):
    inside = Client(site.mounted, f"in-{v5}", v5, will="gone")
    outside = Client(site.plain, f"out-{v5}", v5)
    assert inside.sub("x/#") == [1]
    assert inside.sub("$share/g/shared/#") == [1]
    assert outside.sub("site1/#") == [1]
    inside.pub("x/1", "from-inside")
    outside.pub("site1/x/2", "into-the-mount")
    outside.pub("x/3", "not-under-the-mount")
    outside.pub("site1/shared/4", "shared")
    assert inside.topics() == [("x/1", "from-inside"), ("x/2", "into-the-mount"),
                            ("shared/4", "shared")]
    assert outside.topics(0.1) == [("site1/x/1", "from-inside"),
                                ("site1/x/2", "into-the-mount"),
                                ("site1/shared/4", "shared")]
    # The will lands under the mount point too.
    inside.c._sock.close()  # an unclean end: no DISCONNECT
    inside.c.loop_stop()
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        got = outside.topics(0.2)
        if got:
            break
    assert got == [("site1/gone", "gone")]
    outside.close()


def test_certificates_reload_without_dropping_connections():
    with tempfile.TemporaryDirectory() as d:
        pki(d)
        make_ca(d, "ca2")
        with open(f"{d}/acl", "w") as f:
            f.write("topic readwrite #\n")
        subprocess.run(["mosquitto_passwd", "-c", "-b", f"{d}/passwd", "bob", "b-pass"],
                       check=True, capture_output=True)
        o = Outpost(d, config(d))
        try:
            (port, _, _) = o.ports(" over TLS")
            old = Client(port, "old", True, ca=f"{d}/ca.pem")
            assert old.sub("r/#") == [1]
            assert refused_handshake(port, f"{d}/ca2.pem") is not None
            # Renew in place: a certificate from another CA, written over the old files.
            make_cert(d, "ca2", "renewed", "localhost", "serverAuth")
            os.replace(f"{d}/renewed.pem", f"{d}/server.pem")
            os.replace(f"{d}/renewed.key", f"{d}/server.key")
            mark = o.reload(config(d))
            o.wait_log(r"SIGHUP: reloaded; .*certificates of 4 TLS listeners", start=mark)
            new = Client(port, "new", True, ca=f"{d}/ca2.pem")
            assert not new.rc.is_failure
            assert refused_handshake(port, f"{d}/ca.pem") is not None
            # The connection made before the reload is still up and still served.
            new.pub("r/1", "after-reload")
            old.pub("r/2", "old-still-talks")
            assert old.topics() == [("r/1", "after-reload"), ("r/2", "old-still-talks")]
            # A broken key is refused whole; the renewed certificate stays in force.
            with open(f"{d}/server.key", "w") as f:
                f.write("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
            mark = o.reload(config(d))
            o.wait_log(r"reload refused.*key_file", start=mark)
            again = Client(port, "again", True, ca=f"{d}/ca2.pem")
            assert not again.rc.is_failure
            for c in (old, new, again):
                c.close()
        finally:
            o.stop()
