#!/usr/bin/env bash
# Interop tests: the release binary against third-party peers.
#   test_rtu_pymodbus.py  pymodbus RTU slave on a socat pty pair (sounder coil, fire.alarm)
#   test_mosquitto.py     mosquitto: status, events, commands, broker outage, SIGTERM, will
#   test_tls.py           mosquitto with TLS client certificates required + password (openssl certs)
#   test_crash_mosquitto.py  tests/crash.rs against mosquitto with 30 SIGKILLs (needs cargo)
# Needs: target/release/village-gateway (or VGW_BIN), .venv with pymodbus + paho-mqtt (or PYTHON),
# socat, mosquitto. By hand: bash tests/interop/run.sh [test_name.py ...]
# Prints "interop: N passed, M failed" last; exits non-zero if anything failed.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
export VGW_BIN=${VGW_BIN:-$ROOT/target/release/village-gateway}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
TEST_TIMEOUT=${INTEROP_TEST_TIMEOUT:-300}   # seconds per test script

missing=()
[ -x "$VGW_BIN" ] || missing+=("the gateway binary $VGW_BIN (cargo build --release)")
[ -x "$PYTHON" ] || missing+=("python venv $PYTHON (python3 -m venv .venv && .venv/bin/pip install 'pymodbus[serial]==3.11.4' paho-mqtt==2.1.0)")
command -v socat >/dev/null || missing+=("socat (apt-get install socat)")
command -v mosquitto >/dev/null || missing+=("mosquitto (apt-get install mosquitto)")
command -v openssl >/dev/null || missing+=("openssl (apt-get install openssl)")
if [ ${#missing[@]} -gt 0 ]; then
    printf 'interop: missing %s\n' "${missing[@]}" >&2
    echo "interop: 0 passed, 1 failed" | tee ${INTEROP_SUMMARY:+"$INTEROP_SUMMARY"}
    exit 1
fi

export INTEROP_TMP
INTEROP_TMP=$(mktemp -d /tmp/vgw-interop.XXXXXX)
export INTEROP_PIDFILE=$INTEROP_TMP/pids
: >"$INTEROP_PIDFILE"
CURRENT=""

cleanup() {
    local rc=$?
    # the test script kills its own children; this catches what an interrupted one left behind
    if [ -n "$CURRENT" ] && kill -0 "$CURRENT" 2>/dev/null; then
        kill -TERM "$CURRENT" 2>/dev/null || true
        sleep 1
        kill -KILL "$CURRENT" 2>/dev/null || true
    fi
    local pid
    while read -r pid; do
        [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
    done <"$INTEROP_PIDFILE"
    if [ "$rc" -eq 0 ] && [ -z "${KEEP_INTEROP_TMP:-}" ]; then
        rm -rf "$INTEROP_TMP"
    else
        echo "interop: logs in $INTEROP_TMP" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=(test_rtu_pymodbus.py test_mosquitto.py test_tls.py)
[ "$#" -gt 0 ] || tests+=(test_crash_mosquitto.py)

"$VGW_BIN" --version || true
passed=0
failed=0
failed_names=()
for t in "${tests[@]}"; do
    echo
    echo "--- interop: $t"
    t0=$SECONDS
    rc=0
    timeout -k 10 "$TEST_TIMEOUT" "$PYTHON" -u "$HERE/$t" &
    CURRENT=$!
    wait "$CURRENT" || rc=$?
    CURRENT=""
    if [ $rc -eq 0 ]; then
        passed=$((passed + 1))
    else
        [ $rc -eq 124 ] && echo "FAIL $t: timed out after ${TEST_TIMEOUT} s"
        failed=$((failed + 1))
        failed_names+=("$t")
    fi
    echo "--- interop: $t: $([ $rc -eq 0 ] && echo passed || echo "FAILED (exit $rc)") in $((SECONDS - t0)) s"
done

echo
[ $failed -eq 0 ] || echo "interop: failed: ${failed_names[*]}"
echo "interop: $passed passed, $failed failed" | tee ${INTEROP_SUMMARY:+"$INTEROP_SUMMARY"}
[ $failed -eq 0 ]
