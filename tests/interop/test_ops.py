"""Operations against the real binary: `$SYS` topics, `outpost status` (human and JSON) over the
control socket, and reload by SIGHUP (password file, ACL file, bridge rules), with paho-mqtt
and mosquitto_passwd as the peers we did not write."""

import json
import os
import subprocess
import tempfile
import time

import paho.mqtt.client as mqtt
import pytest

from brokers import BIN, Outpost, free_port
from test_acl import Client

TIMEOUT = 10


def config(d, acl="acl", extra=""):
    return f"""
[gateway]
id = "ops"
data_dir = "{d}/data"
sys_interval = "1s"

[auth]
password_file = "{d}/passwd"
acl_file = "{d}/{acl}"

[[listener]]
kind = "mqtt"
bind = "127.0.0.1:0"
allow_anonymous = true

[uplink]
url = "mqtt://127.0.0.1:{DEAD}"
rules_dir = "{d}/rules"
{extra}"""


DEAD = free_port()


@pytest.fixture
def site():
    with tempfile.TemporaryDirectory() as d:
        os.mkdir(f"{d}/rules")
        with open(f"{d}/rules/rules.toml", "w") as f:
            f.write('[[out]]\nfilter = "site/#"\nqos = 1\n')
        with open(f"{d}/acl", "w") as f:
            f.write("topic read $SYS/#\ntopic readwrite site/#\nuser alice\ntopic readwrite #\n")
        subprocess.run(["mosquitto_passwd", "-c", "-b", f"{d}/passwd", "alice", "a-pass"],
                       check=True, capture_output=True)
        o = Outpost(d, config(d))
        yield o
        o.stop()


def status(o, *args):
    r = subprocess.run([BIN, "status", "--config", o.config, *args], capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_sys_topics_and_status_tell_the_same_story(site):
    c = Client(site.port, "tech", True)
    for i in range(5):
        assert c.pub(f"site/tank/{i}", "42") in (0, 0x10)
    # Past the next interval, so the retained values count this client.
    time.sleep(1.5)
    c.c.subscribe("$SYS/#", 0)
    deadline, seen = time.time() + TIMEOUT, {}
    want = {"$SYS/broker/uptime", "$SYS/broker/version", "$SYS/broker/clients/connected",
            "$SYS/outpost/backlog", "$SYS/outpost/uplink/state"}
    while time.time() < deadline and not want <= seen.keys():
        try:
            m = c.messages.get(timeout=1)
            seen[m.topic] = m.payload.decode()
        except Exception:
            pass
    assert seen["$SYS/broker/uptime"].endswith(" seconds")
    assert seen["$SYS/broker/version"].startswith("outpost version ")
    assert int(seen["$SYS/broker/clients/connected"]) >= 1
    # The five readings wait in the outbox: the uplink points at a closed port.
    backlog = json.loads(seen["$SYS/outpost/backlog"])
    assert backlog["messages"] == 5 and backlog["oldest_age_s"] is not None
    assert json.loads(seen["$SYS/outpost/uplink/state"])["state"] in ("connecting", "backoff")
    c.close()

    report = json.loads(status(site, "--json"))
    assert report["backlog"]["messages"] == 5
    assert report["backlog"]["eta_s"] is None
    assert report["uplink"]["state"] in ("connecting", "backoff")
    assert report["messages"]["received"] >= 5
    text = status(site)
    print(text)
    assert "backlog:  5 messages" in text and "not draining" in text
    assert "uplink:   " in text and f"127.0.0.1:{DEAD}" in text
    assert "last error:" in text


def test_status_without_a_daemon_says_why():
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([BIN, "status", "--socket", f"{d}/none.sock"], capture_output=True,
                           text=True, timeout=TIMEOUT)
        assert r.returncode == 1
        assert "is outpost running" in r.stderr


def test_reload_applies_auth_changes_without_dropping_connections(site):
    d = site.dir
    watcher = Client(site.port, "watcher", True, "alice", "a-pass")
    assert watcher.sub("#") == [1]
    anon = Client(site.port, "anon", True)
    assert anon.pub("plant/pump", "before") == 0x87

    # A new user, and anonymous clients may now write plant/.
    subprocess.run(["mosquitto_passwd", "-b", f"{d}/passwd", "bob", "b-pass"], check=True,
                   capture_output=True)
    with open(f"{d}/acl", "a") as f:
        f.write("\n")
    with open(f"{d}/acl", "w") as f:
        f.write("topic read $SYS/#\ntopic readwrite site/#\ntopic write plant/#\n"
                "user alice\ntopic readwrite #\nuser bob\ntopic read #\n")
    mark = site.reload(config(d))
    site.wait_log(r"SIGHUP: reloaded; 2 users, 5 ACL rules", start=mark)
    assert anon.pub("plant/pump", "after") in (0, 0x10)
    bob = Client(site.port, "bob", True, "bob", "b-pass")
    bob.close()
    # Nobody was dropped: the same connections carry on.
    assert anon.c.is_connected() and watcher.c.is_connected()
    topics = [t for t in watcher.topics() if not t[0].startswith("$SYS")]
    assert topics == [("plant/pump", "after")]

    # A broken ACL file: refused whole, the old rules stay.
    with open(f"{d}/acl", "w") as f:
        f.write("topic read $SYS/#\nallow everything\n")
    mark = site.reload(config(d))
    m = site.wait_log(r"reload refused.*", start=mark)
    assert "acl:2" in m.group(0), m.group(0)
    assert anon.pub("plant/pump", "still") in (0, 0x10)

    # A broken config: the same.
    mark = site.reload(config(d) + "\n[nonsense\n")
    site.wait_log(r"reload refused", start=mark)
    assert anon.pub("plant/pump", "and still") in (0, 0x10)

    # A change that needs sockets reopened is named, and the rest applies.
    with open(f"{d}/acl", "w") as f:
        f.write("topic read $SYS/#\ntopic readwrite site/#\nuser alice\ntopic readwrite #\n")
    mark = site.reload(config(d).replace('sys_interval = "1s"', 'sys_interval = "2s"'))
    site.wait_log(r"SIGHUP: reloaded; 2 users, 3 ACL rules.*; waiting for a restart: \[gateway\]",
                  start=mark)
    assert anon.pub("plant/pump", "denied again") == 0x87
    assert anon.c.is_connected() and watcher.c.is_connected()
    for c in (anon, watcher):
        c.close()


def test_reload_of_out_rules(site):
    d = site.dir
    with open(f"{d}/rules/rules.toml", "w") as f:
        f.write('[[out]]\nfilter = "site/#"\nqos = 1\n[[out]]\nfilter = "well/#"\nqos = 1\n')
    mark = site.reload(config(d))
    site.wait_log(r"SIGHUP: reloaded; .*2 out rules", start=mark)
    c = Client(site.port, "w", True, "alice", "a-pass")
    assert c.pub("well/pressure", "7") in (0, 0x10)
    c.close()
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        if json.loads(status(site, "--json"))["backlog"]["messages"] == 1:
            break
        time.sleep(0.2)
    assert json.loads(status(site, "--json"))["backlog"]["messages"] == 1

    # A new priority, or a new [[in]] rule, needs the uplink restarted: named, not applied.
    with open(f"{d}/rules/rules.toml", "w") as f:
        f.write('[[out]]\nfilter = "site/#"\nqos = 1\n[[out]]\nfilter = "well/#"\nqos = 1\n'
                '[[out]]\nfilter = "alarm/#"\nqos = 1\npriority = 3\n'
                '[[in]]\nfilter = "cmd/#"\nqos = 1\n')
    mark = site.reload(config(d))
    site.wait_log(r"SIGHUP: reloaded; .*waiting for a restart: bridge rules \(a new priority\), "
                  r"bridge \[\[in\]\] rules", start=mark)
