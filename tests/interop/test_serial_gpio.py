"""Sensor serial ports and GPIO, end to end with the real binary.

UARTs are ptys (the only thing faked: the wire), reached through symlinks so that a device can
vanish and come back as a USB adapter does. GPIO is the simulated backend, driven through its
directory. The local side is mosquitto_sub/mosquitto_pub and paho-mqtt. An uplink is
configured, pointing at a port where nothing listens, so it is down throughout.
"""

import os
import pty
import select
import struct
import subprocess
import tempfile
import threading
import time
import tty

import paho.mqtt.client as mqtt
import pytest
from brokers import Outpost, free_port
from wire import crc16

TIMEOUT = 10


class Pty:
    """A pty pair whose slave is reachable at `link`."""

    def __init__(self, link):
        self.link = link
        self.master, self.slave = pty.openpty()
        tty.setraw(self.master)
        tty.setraw(self.slave)
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(os.ttyname(self.slave), link)

    def write(self, data):
        os.write(self.master, data)

    def read_until(self, want, limit=TIMEOUT):
        buf, deadline = b"", time.time() + limit
        while time.time() < deadline and want not in buf:
            r, _, _ = select.select([self.master], [], [], 0.2)
            if r:
                buf += os.read(self.master, 4096)
        return buf

    def unplug(self):
        os.unlink(self.link)
        os.close(self.master)
        os.close(self.slave)


class Site:
    def __init__(self, broker, ports):
        self.broker, self.mqtt, self.dir, self.ports = broker, broker.port, broker.dir, ports

    def logged(self, pattern, limit=TIMEOUT):
        try:
            self.broker.wait_log(pattern, limit)
            return True
        except AssertionError:
            return False

    def output(self, chip, line):
        try:
            with open(os.path.join(self.dir, "gpio", f"{chip}.{line}")) as f:
                return f.read().strip()
        except FileNotFoundError:
            return None

    def set_input(self, chip, line, level):
        with open(os.path.join(self.dir, "gpio", "input"), "a") as f:
            f.write(f"{chip} {line} {level}\n")


@pytest.fixture(scope="module")
def site():
    with tempfile.TemporaryDirectory() as d:
        ports = {n: Pty(os.path.join(d, n)) for n in ("ws1", "bin1", "tank")}
        rules = os.path.join(d, "rules")
        os.mkdir(rules)
        with open(os.path.join(rules, "rules.toml"), "w") as f:
            f.write('[[out]]\nfilter = "site/#"\nqos = 1\n')
        o = Outpost(d, f"""
[gateway]
id = "farm"
data_dir = "{d}/data"

[[listener]]
kind = "mqtt"
bind = "127.0.0.1:0"

[uplink]
url = "mqtt://127.0.0.1:{free_port()}"
rules_dir = "{rules}"

[[serial]]
name = "ws1"
device = "{d}/ws1"
baud = 9600
framing = "lines"
decode = "kv"
write_topic = "cmd/ws1"
line_ending = "\\r\\n"

[[serial]]
name = "bin1"
device = "{d}/bin1"
baud = 115200
framing = "len-crc16"
decode = "json"
topic = "{{gateway_id}}/{{name}}/{{key}}"

[[serial]]
name = "tank"
device = "{d}/tank"
framing = "cobs"
decode = "csv"
columns = ["level", "-", "temp"]
topic = "site/tank/{{key}}"
retain = true

[gpio]
backend = "simulated"
sim_dir = "{d}/gpio"

[[gpio.input]]
chip = "sim0"
line = 17
bias = "pull-up"
debounce = "20ms"
topic = "io/door"

[[gpio.output]]
chip = "sim0"
line = 27
topic = "io/pump/set"
state_topic = "io/pump"
initial = "low"
""")
        s = Site(o, ports)
        o.wait_log(r"serial port open.*port=tank")
        yield s
        o.stop()
        # The pump's safe level after shutdown.
        assert s.output("sim0", 27) == "0"
        for p in ports.values():
            try:
                p.unplug()
            except OSError:
                pass


class Sub:
    def __init__(self, port, *topics, count):
        args = ["mosquitto_sub", "-p", str(port), "-v", "-q", "1", "-C", str(count),
                "-W", str(TIMEOUT)]
        for t in topics:
            args += ["-t", t]
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)

    def lines(self):
        out, _ = self.p.communicate(timeout=TIMEOUT + 5)
        return [l for l in out.splitlines() if l]


def len_crc16(body):
    head = struct.pack(">H", len(body)) + body
    return head + struct.pack(">H", crc16(head))


def cobs(data):
    out, block = bytearray(), bytearray()
    for b in data:
        if b == 0:
            out += bytes([len(block) + 1]) + block
            block = bytearray()
        else:
            block.append(b)
            if len(block) == 254:
                out += bytes([255]) + block
                block = bytearray()
    out += bytes([len(block) + 1]) + block
    return bytes(out) + b"\x00"


def test_lines_become_messages_and_garbage_is_dropped(site):
    sub = Sub(site.mqtt, "sensors/ws1/#", count=4)
    p = site.ports["ws1"]
    # A reading split across writes, CRLF, noise, a line that is not key=value, and the
    # other kv form.
    p.write(b"T=21.")
    time.sleep(0.05)
    p.write(b"5,H=40\r\n\x00\xff\xfe\nthis is not kv\nP:1013 W:3.2\n")
    assert sorted(sub.lines()) == sorted([
        "sensors/ws1/T 21.5", "sensors/ws1/H 40", "sensors/ws1/P 1013", "sensors/ws1/W 3.2"])
    assert site.logged(r"does not decode.*port=ws1|port=ws1.*does not decode")


def test_binary_frames_with_bad_crc_and_resync(site):
    sub = Sub(site.mqtt, "farm/bin1/#", "site/tank/#", count=5)
    good = len_crc16(b'{"flow": 12.5, "unit": "l/min"}')
    bad = bytearray(len_crc16(b'{"flow": 99}'))
    bad[4] ^= 0x20
    site.ports["bin1"].write(b"\x13\x37" + bytes(bad) + good + len_crc16(b'{"pressure": 2}'))
    # COBS with a zero byte inside a frame's neighbour, and a column skipped.
    site.ports["tank"].write(b"\x05\x00" + cobs(b"63.5,x,14.2") + cobs(b"1,2"))
    got = sub.lines()
    assert sorted(got) == sorted([
        "farm/bin1/flow 12.5", "farm/bin1/unit l/min", "farm/bin1/pressure 2",
        "site/tank/level 63.5", "site/tank/temp 14.2"]), got
    assert site.logged(r"serial frame dropped.*garbage|garbage.*serial frame dropped")


def test_write_topic_reaches_the_port(site):
    r = subprocess.run(["mosquitto_pub", "-p", str(site.mqtt), "-q", "1", "-t", "cmd/ws1",
                        "-m", "RESET"], timeout=TIMEOUT)
    assert r.returncode == 0
    assert site.ports["ws1"].read_until(b"RESET\r\n").endswith(b"RESET\r\n")


def test_device_vanishes_and_comes_back(site):
    p = site.ports["ws1"]
    p.unplug()
    assert site.logged(r"serial device lost.*port=ws1|port=ws1.*serial device lost")
    # Everything else carries on meanwhile.
    sub = Sub(site.mqtt, "site/tank/level", count=2)
    site.ports["tank"].write(cobs(b"50,x,1"))
    time.sleep(1.5)
    p = site.ports["ws1"] = Pty(p.link)
    sub2 = Sub(site.mqtt, "sensors/ws1/back", count=1)
    # The port is reopened within the backoff (1 s, then 2 s); lines before that are lost
    # with the device, as they would be on a real unplugged adapter.
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and sub2.p.poll() is None:
        p.write(b"back=1\n")
        time.sleep(0.5)
    assert sub2.lines() == ["sensors/ws1/back 1"]
    assert sub.lines()[0] == "site/tank/level 63.5"  # retained, from before
    assert site.logged(r"serial port open.*port=ws1", 1)


def test_gpio_input_through_the_simulator(site):
    sub = Sub(site.mqtt, "io/door", count=2)
    site.set_input("sim0", 17, 0)
    got = sub.lines()
    assert got[0].startswith('io/door {"level":1,'), got  # retained start level
    assert got[1].startswith('io/door {"level":0,"ts":'), got


def test_local_control_loop_with_the_uplink_down(site):
    """A tank sensor on a UART; a paho controller runs the pump through GPIO."""
    assert site.logged(r"uplink", 1)
    ctl = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="controller",
                      protocol=mqtt.MQTTv5)
    seen = []

    def on_message(c, _u, m):
        level = float(m.payload)
        seen.append(level)
        if level < 20:
            c.publish("io/pump/set", "on", qos=1)
        elif level > 80:
            c.publish("io/pump/set", "off", qos=1)

    subscribed = threading.Event()
    ctl.on_message = on_message
    ctl.on_subscribe = lambda *a: subscribed.set()
    ctl.connect("127.0.0.1", site.mqtt)
    ctl.subscribe("site/tank/level", qos=1)
    ctl.loop_start()
    try:
        assert subscribed.wait(TIMEOUT)
        tank = site.ports["tank"]

        def wait_pump(want):
            deadline = time.time() + TIMEOUT
            while time.time() < deadline and site.output("sim0", 27) != want:
                time.sleep(0.05)
            return site.output("sim0", 27)

        tank.write(cobs(b"15.0,x,12.0"))
        assert wait_pump("1") == "1"
        tank.write(cobs(b"50.0,x,12.0"))
        time.sleep(0.3)
        assert site.output("sim0", 27) == "1", "between the marks the pump keeps running"
        tank.write(cobs(b"85.0,x,12.0"))
        assert wait_pump("0") == "0"
        assert 15.0 in seen and 85.0 in seen
        # The pump's state is retained for whoever looks.
        r = subprocess.run(["mosquitto_sub", "-p", str(site.mqtt), "-t", "io/pump", "-C", "1",
                            "-W", "5"], capture_output=True, text=True, timeout=TIMEOUT)
        assert r.stdout.strip() == "0"
        # A nonsense command is refused and the pump stays off.
        subprocess.run(["mosquitto_pub", "-p", str(site.mqtt), "-t", "io/pump/set", "-m",
                        "full blast"], timeout=TIMEOUT)
        assert site.logged(r"GPIO command rejected")
        assert site.output("sim0", 27) == "0"
    finally:
        ctl.loop_stop()
        ctl.disconnect()
    # The uplink never came up.
    assert not site.logged(r"uplink (up|connected)", 0.1)
