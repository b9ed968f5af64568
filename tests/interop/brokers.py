"""Starting the real outpost binary and a real mosquitto for interop tests: free ports, a log
kept and searchable, SIGHUP, and a clean stop that checks the exit code."""

import os
import re
import signal
import socket
import subprocess
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("OUTPOST_BIN", os.path.join(ROOT, "target", "debug", "outpost"))
MOSQUITTO = next((p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if os.path.exists(p)),
                 "mosquitto")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A broker process whose stderr is collected line by line in `log`."""

    def __init__(self, args, env=None):
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True,
                                     env=dict(os.environ, **(env or {})))
        self.log = []
        self._new = threading.Condition()

        def drain():
            for line in self.proc.stderr:
                with self._new:
                    self.log.append(line)
                    self._new.notify_all()

        threading.Thread(target=drain, daemon=True).start()

    def wait_log(self, pattern, limit=20, start=0):
        """The first match of `pattern` in the log from line `start` on, waiting up to `limit`."""
        deadline = time.time() + limit
        with self._new:
            while True:
                for line in self.log[start:]:
                    m = re.search(pattern, line)
                    if m:
                        return m
                left = deadline - time.time()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no {pattern!r} in log:\n" + "".join(self.log[-40:]))
                self._new.wait(left)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=15)
        assert rc == 0, f"exit {rc}:\n" + "".join(self.log[-40:])


class Outpost(Process):
    """outpost with `config` (TOML text; `{dir}` is a fresh directory); `port` is the first MQTT
    listener's bound port."""

    def __init__(self, directory, config, env=None):
        self.dir = directory
        self.config = os.path.join(directory, "outpost.toml")
        with open(self.config, "w") as f:
            f.write(config.replace("{dir}", directory))
        super().__init__([BIN, "run", "--config", self.config],
                         env=dict({"RUST_LOG": "info"}, **(env or {})))
        self.port = int(self.wait_log(r"and 5\.0 on 127\.0\.0\.1:(\d+)").group(1))

    def ports(self, over=""):
        """The bound ports of the MQTT listeners of one kind, in config order: `over` is "" for
        mqtt, " over TLS", " over WebSocket" or " over WebSocket and TLS"."""
        self.wait_log(r"ready: ")
        pattern = re.compile(r"and 5\.0" + re.escape(over) + r" on 127\.0\.0\.1:(\d+)")
        return [int(m.group(1)) for m in map(pattern.search, self.log) if m]

    def reload(self, config):
        """Writes a new config and sends SIGHUP; returns the log position before it."""
        with open(self.config, "w") as f:
            f.write(config.replace("{dir}", self.dir))
        mark = len(self.log)
        self.proc.send_signal(signal.SIGHUP)
        return mark


class Mosquitto(Process):
    """mosquitto with `lines` of config after a listener on a free loopback port."""

    def __init__(self, directory, lines):
        self.port = free_port()
        conf = os.path.join(directory, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write(f"listener {self.port} 127.0.0.1\nuser root\n" + "\n".join(lines) + "\n")
        super().__init__([MOSQUITTO, "-c", conf])
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("mosquitto did not start:\n" + "".join(self.log))
