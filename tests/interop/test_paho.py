"""outpost against paho-mqtt (Python), a client we did not write: MQTT 3.1.1 and 5.0, QoS 0/1/2,
retained messages, wills, persistent sessions, and the MQTT 5 features a client can see."""

import queue
import subprocess
import sys
import tempfile
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from brokers import Outpost

TIMEOUT = 10


@pytest.fixture(scope="module")
def broker():
    """Starts the real outpost on a free port; yields the port."""
    with tempfile.TemporaryDirectory() as d:
        o = Outpost(d, f'[gateway]\nid = "paho"\ndata_dir = "{d}/data"\n'
                       '[[listener]]\nkind = "mqtt"\nbind = "127.0.0.1:0"\n')
        yield o.port
        o.stop()


class Client:
    """A paho client with a message queue and blocking helpers."""

    def __init__(self, port, client_id="", v5=True, clean=True, props=None, will=None):
        proto = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        kw = {} if v5 else {"clean_session": clean}
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto, **kw
        )
        self.messages = queue.Queue()
        self.connack = queue.Queue()
        self.disconnects = queue.Queue()
        self.subacks = queue.Queue()
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_connect = lambda c, u, f, rc, p: self.connack.put((f, rc, p))
        self.c.on_disconnect = lambda c, u, f, rc, p: self.disconnects.put(rc)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put(rcs)
        if will:
            self.c.will_set(*will)
        if v5:
            self.c.connect("127.0.0.1", port, 30, clean_start=clean, properties=props)
        else:
            self.c.connect("127.0.0.1", port, 30)
        self.c.loop_start()
        self.flags, self.rc, self.props = self.connack.get(timeout=TIMEOUT)
        assert not self.rc.is_failure, self.rc

    def sub(self, topic, qos=0, props=None, options=None):
        if options is not None:
            self.c.subscribe(topic, options=options, properties=props)
        else:
            self.c.subscribe(topic, qos, properties=props)
        return self.subacks.get(timeout=TIMEOUT)

    def pub(self, topic, payload, qos=0, retain=False, props=None):
        info = self.c.publish(topic, payload, qos, retain, properties=props)
        info.wait_for_publish(TIMEOUT)
        return info

    def get(self, n, timeout=TIMEOUT):
        out = []
        deadline = time.time() + timeout
        while len(out) < n:
            out.append(self.messages.get(timeout=max(0.01, deadline - time.time())))
        return out

    def none(self, wait=0.5):
        time.sleep(wait)
        return self.messages.empty()

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5.0"])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_qos_in_order(broker, v5, qos):
    topic = f"paho/qos/{int(v5)}/{qos}"
    s = Client(broker, v5=v5)
    s.sub(topic, qos)
    p = Client(broker, v5=v5)
    for i in range(50):
        p.pub(topic, str(i), qos)
    got = s.get(50)
    assert [m.payload.decode() for m in got] == [str(i) for i in range(50)]
    assert all(m.qos == qos for m in got)
    s.close()
    p.close()


@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5.0"])
def test_retained(broker, v5):
    topic = f"paho/ret/{int(v5)}"
    p = Client(broker, v5=v5)
    p.pub(topic, "kept", 1, retain=True)
    s = Client(broker, v5=v5)
    s.sub(topic, 1)
    (m,) = s.get(1)
    assert m.retain and m.payload == b"kept"
    p.pub(topic, "", 1, retain=True)
    s2 = Client(broker, v5=v5)
    s2.sub(topic, 1)
    assert s2.none()
    for c in (p, s, s2):
        c.close()


WILL_CHILD = """
import sys, time, paho.mqtt.client as mqtt
v5 = sys.argv[2] == "5"
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="will-child-" + sys.argv[2],
                protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
c.will_set("paho/will/" + sys.argv[2], "died", 1)
c.connect("127.0.0.1", int(sys.argv[1]), 30)
c.loop_start()
print("up", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("level", ["4", "5"])
def test_will_on_kill(broker, level):
    s = Client(broker)
    s.sub(f"paho/will/{level}", 1)
    child = subprocess.Popen(
        [sys.executable, "-c", WILL_CHILD, str(broker), level], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "up"
    time.sleep(0.3)
    child.kill()
    child.wait()
    (m,) = s.get(1)
    assert m.payload == b"died"
    s.close()


def test_persistent_session_311(broker):
    c = Client(broker, "paho-durable-311", v5=False, clean=False)
    c.sub("paho/dur311", 1)
    c.close()
    p = Client(broker, v5=False)
    for i in range(10):
        p.pub("paho/dur311", str(i), 1)
    c = Client(broker, "paho-durable-311", v5=False, clean=False)
    assert c.flags.session_present
    assert [m.payload.decode() for m in c.get(10)] == [str(i) for i in range(10)]
    c.close()
    p.close()


def test_persistent_session_5_with_expiry(broker):
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 300
    c = Client(broker, "paho-durable-5", clean=False, props=props)
    c.sub("paho/dur5", 2)
    c.close()
    p = Client(broker)
    for i in range(10):
        p.pub("paho/dur5", str(i), 2)
    c = Client(broker, "paho-durable-5", clean=False, props=props)
    assert c.flags.session_present
    got = c.get(10)
    assert [m.payload.decode() for m in got] == [str(i) for i in range(10)]
    assert all(m.qos == 2 for m in got)
    c.close()
    # Session expiry 0 on a later connection: the session ends at disconnect.
    c = Client(broker, "paho-durable-5", clean=False)
    assert c.flags.session_present
    c.close()
    c = Client(broker, "paho-durable-5", clean=False)
    assert not c.flags.session_present
    c.close()
    p.close()


def test_v5_properties_travel_end_to_end(broker):
    s = Client(broker)
    s.sub("paho/props", 1)
    p = Client(broker)
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("site", "042"), ("site", "again")]
    props.ResponseTopic = "paho/reply"
    props.CorrelationData = b"\x00\x01corr"
    props.ContentType = "text/plain"
    props.PayloadFormatIndicator = 1
    props.MessageExpiryInterval = 120
    p.pub("paho/props", "hello", 1, props=props)
    (m,) = s.get(1)
    got = m.properties
    assert got.UserProperty == [("site", "042"), ("site", "again")]
    assert got.ResponseTopic == "paho/reply"
    assert got.CorrelationData == b"\x00\x01corr"
    assert got.ContentType == "text/plain"
    assert got.PayloadFormatIndicator == 1
    assert 118 <= got.MessageExpiryInterval <= 120
    s.close()
    p.close()


def test_v5_request_response(broker):
    responder = Client(broker)
    responder.sub("paho/service", 1)
    requester = Client(broker)
    requester.sub("paho/responses/me", 1)
    req = Properties(PacketTypes.PUBLISH)
    req.ResponseTopic = "paho/responses/me"
    req.CorrelationData = b"42"
    requester.pub("paho/service", "ping", 1, props=req)
    (m,) = responder.get(1)
    resp = Properties(PacketTypes.PUBLISH)
    resp.CorrelationData = m.properties.CorrelationData
    responder.pub(m.properties.ResponseTopic, "pong", 1, props=resp)
    (r,) = requester.get(1)
    assert r.payload == b"pong" and r.properties.CorrelationData == b"42"
    responder.close()
    requester.close()


def test_v5_subscription_ids_no_local_retain_as_published(broker):
    c = Client(broker)
    sp = Properties(PacketTypes.SUBSCRIBE)
    sp.SubscriptionIdentifier = 7
    c.sub("paho/sid/+", props=sp, options=SubscribeOptions(qos=1, noLocal=True))
    other = Client(broker)
    sp2 = Properties(PacketTypes.SUBSCRIBE)
    sp2.SubscriptionIdentifier = 9
    other.sub("paho/sid/#", props=sp2, options=SubscribeOptions(qos=1, retainAsPublished=True))
    c.pub("paho/sid/x", "from c", 1, retain=True)
    assert c.none(), "no local"
    (m,) = other.get(1)
    assert m.properties.SubscriptionIdentifier == [9]
    assert m.retain, "retain as published"
    other.pub("paho/sid/y", "from other", 1)
    (m,) = c.get(1)
    assert m.properties.SubscriptionIdentifier == [7]
    c.pub("paho/sid/x", "", 1, retain=True)
    c.close()
    other.close()


def test_v5_shared_subscription_splits_the_load(broker):
    a, b = Client(broker), Client(broker)
    a.sub("$share/workers/paho/jobs", 1)
    b.sub("$share/workers/paho/jobs", 1)
    p = Client(broker)
    for i in range(20):
        p.pub("paho/jobs", str(i), 1)
    time.sleep(0.5)
    got_a = [m.payload.decode() for m in a.get(a.messages.qsize())]
    got_b = [m.payload.decode() for m in b.get(b.messages.qsize())]
    assert sorted(got_a + got_b, key=int) == [str(i) for i in range(20)]
    assert got_a and got_b
    for c in (a, b, p):
        c.close()


def test_v5_client_topic_alias(broker):
    s = Client(broker)
    s.sub("paho/alias", 1)
    p = Client(broker)
    props = Properties(PacketTypes.PUBLISH)
    props.TopicAlias = 1
    p.pub("paho/alias", "first", 1, props=props)
    p.pub("", "second", 1, props=props)
    got = s.get(2)
    assert [(m.topic, m.payload) for m in got] == [("paho/alias", b"first"), ("paho/alias", b"second")]
    s.close()
    p.close()


def test_v5_assigned_client_id_and_connack_properties(broker):
    c = Client(broker, "")
    assert c.props.AssignedClientIdentifier
    assert c.props.ReceiveMaximum == 100
    assert c.props.TopicAliasMaximum == 10
    c.close()


def test_v5_session_takeover(broker):
    # paho-mqtt 2.1 reads a DISCONNECT reason code only when properties follow it
    # (remaining length > 2), so the old connection is a raw socket: we check the bytes.
    import socket

    raw = socket.create_connection(("127.0.0.1", broker), timeout=TIMEOUT)
    cid = b"paho-takeover"
    body = b"\x00\x04MQTT\x05\x02\x00\x3c\x00" + len(cid).to_bytes(2, "big") + cid
    raw.sendall(bytes([0x10, len(body)]) + body)
    assert raw.recv(2)[0] == 0x20
    raw.recv(64)
    second = Client(broker, "paho-takeover")
    data = b""
    while True:
        chunk = raw.recv(64)
        if not chunk:
            break
        data += chunk
    assert data == b"\xe0\x01\x8e", data  # DISCONNECT, Session taken over, then closed
    second.close()


def test_v5_unsubscribe_reason_codes(broker):
    c = Client(broker)
    c.sub("paho/u", 1)
    got = queue.Queue()
    c.c.on_unsubscribe = lambda cl, u, mid, rcs, p: got.put(rcs)
    c.c.unsubscribe(["paho/u", "paho/never"])
    rcs = got.get(timeout=TIMEOUT)
    assert [r.value for r in rcs] == [0x00, 0x11]
    c.close()
