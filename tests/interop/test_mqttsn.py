"""outpost's MQTT-SN gateway against mqtt-sn-12 (PyPI), a client we did not write, with
mosquitto_sub/mosquitto_pub as the local MQTT side. What that client cannot do (wake a sleeping
client by PINGREQ with its client id, take a QoS 2 delivery, stay silent to provoke
retransmission, speak over a serial line) is done with raw datagrams built here by hand."""

import os
import pty
import select
import socket
import struct
import subprocess
import tempfile
import time
import tty

import pytest
from brokers import Outpost
from wire import crc16
from mqttsn12.client.MqttSnClient import MqttSnClient, MqttSnListener

VENV_BIN = os.path.dirname(os.path.abspath(os.sys.executable))
TIMEOUT = 10


class Gateway:
    def __init__(self, broker, sn, serial_master):
        self.broker, self.mqtt, self.sn, self.serial = broker, broker.port, sn, serial_master


@pytest.fixture(scope="module")
def gw():
    """Starts outpost with MQTT on TCP, MQTT-SN on UDP and on a pty standing in for a UART."""
    master, slave = pty.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    slave_path = os.ttyname(slave)
    with tempfile.TemporaryDirectory() as d:
        o = Outpost(d, (
            f'[gateway]\nid = "sn"\ndata_dir = "{d}/data"\n'
            '[[listener]]\nkind = "mqtt"\nbind = "127.0.0.1:0"\n'
            '[[listener]]\nkind = "mqtt-sn"\nbind = "127.0.0.1:0"\n'
            f'[[listener]]\nkind = "mqtt-sn-serial"\ndevice = "{slave_path}"\n'
            "baud = 115200\nqos_minus_one = true\n"
            "[mqttsn]\ngateway_id = 42\n"
            'predefined = [{ id = 1, topic = "sensors/soil/moisture" },'
            ' { id = 2, topic = "pre/two" }]\n'
            'qos_minus_one_from = ["127.0.0.0/8"]\n'
            'retry = { interval = "1s", count = 2 }\n'
        ))
        sn = int(o.wait_log(r"gateway on UDP 127\.0\.0\.1:(\d+)").group(1))
        g = Gateway(o, sn, master)
        yield g
        o.stop()
        os.close(master)
        os.close(slave)


class Sub:
    """mosquitto_sub on the local broker: the MQTT side that must see every message."""

    def __init__(self, port, *topics, count):
        args = ["mosquitto_sub", "-p", str(port), "-v", "-C", str(count), "-W", str(TIMEOUT)]
        for t in topics:
            args += ["-t", t]
        # Payloads may be any bytes; keep them, undecodable ones included.
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True,
                                  errors="surrogateescape")
        # mosquitto_sub has no "subscribed" signal; give it a moment to subscribe.
        time.sleep(0.3)

    def lines(self):
        out, _ = self.p.communicate(timeout=TIMEOUT + 5)
        return [l for l in out.splitlines() if l]


def sn_tool(name, *args):
    r = subprocess.run([os.path.join(VENV_BIN, name), *args], capture_output=True, text=True,
                       timeout=TIMEOUT + 5)
    assert r.returncode == 0, f"{name} {args}: {r.stdout} {r.stderr}"
    return r.stdout


# --- Raw MQTT-SN, for what mqtt-sn-12 lacks -------------------------------------------------

def frame(msg_type, body=b""):
    n = len(body) + 2
    return bytes([n, msg_type]) + body if n < 256 else b"\x01" + struct.pack(">H", n + 2) + bytes([msg_type]) + body


def parse(d):
    if d[0] == 1:
        return d[3], d[4:]
    return d[1], d[2:]


CONNECT, CONNACK, REGISTER, REGACK, PUBLISH, PUBACK = 0x04, 0x05, 0x0A, 0x0B, 0x0C, 0x0D
PUBCOMP, PUBREC, PUBREL, SUBSCRIBE, SUBACK = 0x0E, 0x0F, 0x10, 0x12, 0x13
PINGREQ, PINGRESP, DISCONNECT, SEARCHGW, GWINFO = 0x16, 0x17, 0x18, 0x01, 0x02


class Raw:
    def __init__(self, port):
        self.s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.s.settimeout(TIMEOUT)
        self.addr = ("127.0.0.1", port)

    def send(self, t, body=b""):
        self.s.sendto(frame(t, body), self.addr)

    def recv(self, timeout=TIMEOUT):
        self.s.settimeout(timeout)
        d, _ = self.s.recvfrom(70000)
        return parse(d)

    def expect(self, want):
        t, body = self.recv()
        assert t == want, f"expected type 0x{want:02x}, got 0x{t:02x} {body!r}"
        return body

    def connect(self, cid, clean=True, keep_alive=30):
        self.send(CONNECT, bytes([0x04 if clean else 0, 1]) + struct.pack(">H", keep_alive) + cid.encode())
        assert self.expect(CONNACK) == b"\x00"

    def subscribe(self, topic, qos, msg_id):
        self.send(SUBSCRIBE, bytes([qos << 5]) + struct.pack(">H", msg_id) + topic.encode())
        body = self.expect(SUBACK)
        assert body[-1] == 0, body
        return body


# --- Tests ---------------------------------------------------------------------------------

def test_publish_every_qos_and_topic_kind_reaches_mosquitto_sub(gw):
    sub = Sub(gw.mqtt, "sn/#", "ab", "sensors/soil/moisture", "pre/two", count=11)
    p = gw.sn
    for q in (0, 1, 2):
        sn_tool("mqtt_sn_pub", "-p", str(p), "-q", str(q), "-t", f"sn/normal/{q}", "-m", f"n{q}")
        sn_tool("mqtt_sn_pub", "-p", str(p), "-q", str(q), "-t", "ab", "-m", f"s{q}")
        sn_tool("mqtt_sn_pub", "-p", str(p), "-q", str(q), "-T", "1", "-m", f"p{q}")
    # QoS -1: no connection, predefined or short topic, from an allowed network.
    sn_tool("mqtt_sn_pub", "-p", str(p), "-q", "-1", "-T", "2", "-m", "m1")
    sn_tool("mqtt_sn_pub", "-p", str(p), "-q", "-1", "-t", "ab", "-m", "m2")
    got = sub.lines()
    want = [f"sn/normal/{q} n{q}" for q in (0, 1, 2)] + [f"ab s{q}" for q in (0, 1, 2)]
    want += [f"sensors/soil/moisture p{q}" for q in (0, 1, 2)] + ["pre/two m1", "ab m2"]
    assert sorted(got) == sorted(want)


class Collect(MqttSnListener):
    def __init__(self):
        self.got = []

    def message_arrived(self, msg):
        self.got.append((msg.get_topic_name(), msg.get_payload().decode()))


def poll_until(client, listener, n, limit=TIMEOUT):
    deadline = time.time() + limit
    while len(listener.got) < n and time.time() < deadline:
        client.polling()
        time.sleep(0.02)
    return listener.got


# QoS 0 only: mqtt-sn-12 1.0.9 never acknowledges a QoS 1 delivery (its polling() compares the
# shifted QoS with the unshifted flag), so QoS 1/2 deliveries are tested raw below.
@pytest.mark.parametrize("qos", [0])
def test_wildcard_short_and_predefined_subscriptions(gw, qos):
    c = MqttSnClient()
    c.set_client_id(f"sub-{qos}")
    c.set_keep_alive(30)
    c.open("127.0.0.1", gw.sn)
    c.send_connect()
    got = Collect()
    c.send_subscribe(f"wc{qos}/+/temp", qos, got)
    c.send_subscribe("zz", qos, got)
    c.send_subscribe_predefined(1, qos, got)
    for t, m in [(f"wc{qos}/a/temp", "1"), (f"wc{qos}/b/temp", "2"), ("zz", "3"),
                 ("sensors/soil/moisture", "4"), (f"wc{qos}/a/temp", "5")]:
        subprocess.run(["mosquitto_pub", "-p", str(gw.mqtt), "-q", "1", "-t", t, "-m", m],
                       check=True, timeout=TIMEOUT)
    msgs = poll_until(c, got, 5)
    assert [m for _, m in msgs] == ["1", "2", "3", "4", "5"]
    # The wildcard matches were REGISTERed first, so the client knows their names.
    assert msgs[0][0] == f"wc{qos}/a/temp" and msgs[1][0] == f"wc{qos}/b/temp"
    c.send_disconnect()
    c.close()


def test_will_published_when_client_goes_silent(gw):
    sub = Sub(gw.mqtt, "wills/#", count=1)
    c = MqttSnClient()
    c.set_client_id("willing")
    c.set_keep_alive(1)
    c.set_will("wills/willing", "gone", 1, False)
    c.open("127.0.0.1", gw.sn)
    c.send_connect()
    # No DISCONNECT, no PINGREQ: after 1.5 x keep-alive the gateway takes it as lost.
    c.close()
    assert sub.lines() == ["wills/willing gone"]


def test_disconnect_with_duration_then_wake_up_by_pingreq(gw):
    c = MqttSnClient()
    c.set_client_id("sleepy")
    c.set_clean_session(False)
    c.set_keep_alive(30)
    c.open("127.0.0.1", gw.sn)
    c.send_connect()
    c.send_subscribe("sleep/#", 1, Collect())
    c.send_disconnect(60)  # mqtt-sn-12's DISCONNECT with a sleep duration
    port = c.datagram_socket.getsockname()[1]
    c.close()
    for i in range(3):
        subprocess.run(["mosquitto_pub", "-p", str(gw.mqtt), "-q", "1", "-t", f"sleep/{i}",
                        "-m", f"z{i}"], check=True, timeout=TIMEOUT)
    # Wake it from the same address, raw: mqtt-sn-12 cannot send PINGREQ with a client id.
    r = Raw(gw.sn)
    r.s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    r.s.bind(("127.0.0.1", port))
    r.send(PINGREQ, b"sleepy")
    got, names = [], {}
    while True:
        t, body = r.recv()
        if t == REGISTER:
            tid, mid = struct.unpack(">HH", body[:4])
            names[tid] = body[4:].decode()
            r.send(REGACK, struct.pack(">HHB", tid, mid, 0))
        elif t == PUBLISH:
            flags, tid, mid = body[0], *struct.unpack(">HH", body[1:5])
            got.append((names.get(tid), body[5:].decode()))
            assert (flags >> 5) & 3 == 1
            r.send(PUBACK, struct.pack(">HHB", tid, mid, 0))
        elif t == PINGRESP:
            break
        else:
            raise AssertionError(f"unexpected type 0x{t:02x}")
    assert got == [(f"sleep/{i}", f"z{i}") for i in range(3)]
    # Asleep again: nothing comes until the next wake.
    subprocess.run(["mosquitto_pub", "-p", str(gw.mqtt), "-q", "1", "-t", "sleep/x", "-m", "x"],
                   check=True, timeout=TIMEOUT)
    with pytest.raises(socket.timeout):
        r.recv(timeout=1)
    r.send(DISCONNECT)  # awake the session ends for good
    r.expect(DISCONNECT)


def test_qos2_delivery_to_sn_client_and_retransmission(gw):
    r = Raw(gw.sn)
    r.connect("raw-q2")
    r.subscribe("q2", 2, 1)  # two characters: a short topic name
    subprocess.run(["mosquitto_pub", "-p", str(gw.mqtt), "-q", "2", "-t", "q2", "-m", "two"],
                   check=True, timeout=TIMEOUT)
    body = r.expect(PUBLISH)
    flags, mid = body[0], struct.unpack(">H", body[3:5])[0]
    assert (flags >> 5) & 3 == 2 and not flags & 0x80 and body[1:3] == b"q2" and body[5:] == b"two"
    # Stay silent: T_retry (1s here) later it comes again, with DUP.
    t0 = time.time()
    body = r.expect(PUBLISH)
    assert body[0] & 0x80 and struct.unpack(">H", body[3:5])[0] == mid
    assert 0.7 < time.time() - t0 < 3
    r.send(PUBREC, struct.pack(">H", mid))
    assert struct.unpack(">H", r.expect(PUBREL))[0] == mid
    r.send(PUBCOMP, struct.pack(">H", mid))
    r.send(DISCONNECT)
    r.expect(DISCONNECT)


def test_searchgw_and_puback_topic_id_byte_order(gw):
    r = Raw(gw.sn)
    r.send(SEARCHGW, b"\x01")
    assert r.expect(GWINFO) == b"\x2a"  # gateway id 42, no address from a gateway
    r.connect("raw-order")
    # Short topic "ab": PUBACK echoes 'a','b' in that order.
    r.send(PUBLISH, bytes([0x20 | 0x02]) + b"ab" + struct.pack(">H", 7) + b"x")
    assert r.expect(PUBACK) == b"ab" + struct.pack(">H", 7) + b"\x00"
    # Predefined 0x0001: big-endian.
    r.send(PUBLISH, bytes([0x20 | 0x01]) + b"\x00\x01" + struct.pack(">H", 8) + b"x")
    assert r.expect(PUBACK) == b"\x00\x01" + struct.pack(">H", 8) + b"\x00"
    # An unknown normal id: rejected, invalid topic id.
    r.send(PUBLISH, bytes([0x20]) + b"\x12\x34" + struct.pack(">H", 9) + b"x")
    assert r.expect(PUBACK) == b"\x12\x34" + struct.pack(">H", 9) + b"\x02"
    # Garbage is dropped; the client is still served.
    r.s.sendto(b"\x05\x0c\x00", r.addr)
    r.s.sendto(b"\xff\xff\xff", r.addr)
    r.send(PINGREQ)
    r.expect(PINGRESP)


# --- Serial: SLIP frames with CRC-16 over a pty ---------------------------------------------

END, ESC, ESC_END, ESC_ESC = 0xC0, 0xDB, 0xDC, 0xDD


def slip(msg):
    out = bytearray([END])
    for b in msg + struct.pack(">H", crc16(msg)):
        out += bytes([ESC, ESC_END]) if b == END else bytes([ESC, ESC_ESC]) if b == ESC else bytes([b])
    out.append(END)
    return bytes(out)


def read_frame(fd, limit=TIMEOUT):
    buf, deadline = bytearray(), time.time() + limit
    while time.time() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if not r:
            continue
        buf += os.read(fd, 4096)
        parts = bytes(buf).split(bytes([END]))
        for p in parts[:-1]:
            if not p:
                continue
            body = p.replace(bytes([ESC, ESC_END]), bytes([END])).replace(bytes([ESC, ESC_ESC]), bytes([ESC]))
            msg, crc = body[:-2], struct.unpack(">H", body[-2:])[0]
            assert crc16(msg) == crc
            return parse(msg)
    raise AssertionError("no frame from the gateway on the serial line")


def test_serial_line_with_noise(gw):
    sub = Sub(gw.mqtt, "serial/#", "sensors/soil/moisture", count=2)
    fd = gw.serial
    os.write(fd, b"\x00\x13\x37garbage" + bytes([END]))  # line noise first
    os.write(fd, slip(frame(CONNECT, bytes([0x04, 1]) + struct.pack(">H", 30) + b"uart-1")))
    assert read_frame(fd) == (CONNACK, b"\x00")
    os.write(fd, slip(frame(REGISTER, struct.pack(">HH", 0, 1) + b"serial/temp")))
    t, body = read_frame(fd)
    assert t == REGACK and body[4] == 0
    tid = body[:2]
    # A frame with a broken CRC is dropped; the next one is served.
    bad = bytearray(slip(frame(PUBLISH, bytes([0x20]) + tid + struct.pack(">H", 2) + b"bad")))
    bad[-3] ^= 0x01
    os.write(fd, bytes(bad))
    os.write(fd, slip(frame(PUBLISH, bytes([0x20]) + tid + struct.pack(">H", 3) + b"\xc0\xdb ok")))
    assert read_frame(fd) == (PUBACK, tid + struct.pack(">H", 3) + b"\x00")
    # QoS -1 is allowed on this line by its listener's config.
    os.write(fd, slip(frame(PUBLISH, bytes([0x60 | 0x01]) + b"\x00\x01" + b"\x00\x00" + b"m1")))
    want = ["serial/temp " + b"\xc0\xdb ok".decode("utf-8", "surrogateescape"),
            "sensors/soil/moisture m1"]
    assert sorted(sub.lines()) == sorted(want)
