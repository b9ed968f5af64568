#!/bin/sh
# The smoke image's self-test, run once at boot inside the guest by outpost-selftest.service.
# Prints one line per check to the console, then "SELFTEST: PASS" or "SELFTEST: FAIL", and
# powers off. image/build-smoke reads the console.
set -u
exec >/dev/console 2>&1
say() { echo "SELFTEST: $*"; }
failed=0
check() {
    name=$1; shift
    if "$@"; then say "ok   $name"; else say "FAIL $name"; failed=1; fi
}
prop() { systemctl show -P "$1" outpost.service; }

say "$(outpost --version 2>&1 | head -n1) on $(uname -m), kernel $(uname -r)"

# Past one watchdog period (WatchdogSec=30s) since outpost became active.
wd=$(prop WatchdogUSec)
sleep 40
check "service active"                  systemctl is-active -q outpost.service
check "no restarts after watchdog $wd"  test "$(prop NRestarts)" = 0
pid=$(prop MainPID)
check "state directory writable by outpost" \
    nsenter -t "$pid" -m setpriv --reuid=outpost --regid=outpost --init-groups \
    sh -c 'echo x > /var/lib/outpost/.selftest && rm /var/lib/outpost/.selftest'
check "/etc read-only to outpost (even for root in its namespace)" \
    sh -c "! nsenter -t $pid -m sh -c 'touch /etc/outpost/.selftest' 2>/dev/null"
touch /root/.selftest-marker
check "/root hidden from outpost (ProtectHome)" \
    nsenter -t "$pid" -m sh -c '! test -e /root/.selftest-marker'
rm -f /root/.selftest-marker
check "store on disk" test -s /var/lib/outpost/outpost.db

# QoS 1 through the broker, with a user the image made with `outpost passwd`.
rm -f /tmp/got
mosquitto_sub -h 127.0.0.1 -p 1883 -u selftest -P selftest -q 1 -t 'selftest/#' -C 1 -W 20 -v > /tmp/got &
sub=$!
sleep 2
mosquitto_pub -h 127.0.0.1 -p 1883 -u selftest -P selftest -q 1 -t selftest/ping -m "hello from the guest"
wait $sub
check "QoS 1 message published to the broker came back" grep -qx "selftest/ping hello from the guest" /tmp/got
check "anonymous refused on 0.0.0.0:1883" \
    sh -c '! mosquitto_pub -h 127.0.0.1 -p 1883 -q 1 -t x -m y 2>/dev/null'

say "exposure: $(systemd-analyze security outpost.service 2>/dev/null | tail -n1)"
outpost status --socket /run/outpost/control.sock 2>&1 | sed 's/^/SELFTEST:   /'

# A hung daemon: stop it, so its watchdog pings stop; systemd must kill and restart it.
kill -STOP "$pid"
restarted=no
for _ in $(seq 1 120); do
    sleep 1
    if [ "$(prop NRestarts)" = 1 ] && [ "$(prop MainPID)" != "$pid" ] \
        && systemctl is-active -q outpost.service; then
        restarted=yes
        break
    fi
done
check "a hung outpost is restarted by its watchdog" test "$restarted" = yes
journalctl -u outpost.service -o cat --no-pager | grep -i "watchdog" | head -n 3 | sed 's/^/SELFTEST:   /'

if [ "$failed" = 0 ]; then say "PASS"; else say "FAIL"; fi
systemctl poweroff
