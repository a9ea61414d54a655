#!/usr/bin/env bash
# Creates build/venv-paho1: the project's venv, but with paho-mqtt 1.6.1 (the
# version azure-iot-device pins) instead of 2.x, plus azure-iot-device itself,
# so the MQTT tests run against both paho majors and the IoT Hub sink runs with
# the real SDK. Installed here: paho, azure-iot-device (--no-deps) and those of
# its pure-Python dependencies that the main venv lacks. Every other package
# comes from the main venv through a .pth line placed after this venv's own
# site-packages, so paho 1.6.1 shadows the main venv's paho 2.x and nothing else
# is duplicated. (azure-iot-device must not go into the main venv: it would
# downgrade paho there.)
#
#   tools/paho1-venv.sh [MAIN_VENV] [OUT]     # defaults: .venv build/venv-paho1
#   build/venv-paho1/bin/python -m pytest tests/test_outbox.py tests/test_mqtt.py \
#       tests/test_mqtt_outage.py tests/test_iothub.py
#
# Everything is installed with the main venv's pip, which `make` brings to a
# known version first (PIP_BOOTSTRAP in the Makefile), so this does not depend
# on the pip the machine ships; the script refuses an older one.
#
# Idempotent: reruns only check and exit when the venv is already complete.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MAIN="${1:-$ROOT/.venv}"
OUT="${2:-$ROOT/build/venv-paho1}"
PAHO_VERSION="1.6.1"
AZURE_VERSION="2.14.0"
# azure-iot-device 2.14.0's requirements (and requests' own), as
# "distribution spec=import name"; only those the main venv cannot import are
# installed here.
AZURE_DEPS=(
  "urllib3>=2.2.2,<3=urllib3"
  "deprecation>=2.1.0,<3=deprecation"
  "requests>=2.32.3,<3=requests"
  "requests-unixsocket2>=0.4.1=requests_unixsocket"
  "janus=janus"
  "PySocks=socks"
  "typing-extensions=typing_extensions"
  "packaging=packaging"
  "idna=idna"
  "certifi=certifi"
  "charset-normalizer=charset_normalizer"
)
MARK="$OUT/.paho1-ok"

if [ ! -x "$MAIN/bin/python" ]; then
  echo "paho1-venv: no venv at $MAIN (run 'make setup-test' first)" >&2
  exit 1
fi
pip_major="$("$MAIN/bin/python" -m pip --version | awk '{split($2, v, "."); print v[1]}')"
if [ "$pip_major" -lt 24 ]; then
  echo "paho1-venv: $MAIN has pip $pip_major.x; run 'make setup-test' (it installs a known pip)" >&2
  exit 1
fi
main_site="$("$MAIN/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
main_py="$("$MAIN/bin/python" -c 'import sys; print(sys.executable)')"
if [ -f "$MARK" ] && [ "$(cat "$MARK")" = "$main_site $PAHO_VERSION $AZURE_VERSION" ]; then
  exit 0
fi

rm -rf "$OUT"
# The same interpreter as the main venv, so its compiled packages load here.
"$main_py" -m venv --without-pip "$OUT"
out_site="$("$OUT/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$MAIN/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
  --target "$out_site" "paho-mqtt==$PAHO_VERSION" "azure-iot-device==$AZURE_VERSION"
missing=()
for dep in "${AZURE_DEPS[@]}"; do
  spec="${dep%=*}" module="${dep##*=}"
  if ! "$MAIN/bin/python" -c "import $module" 2>/dev/null; then
    missing+=("$spec")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  "$MAIN/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
    --target "$out_site" "${missing[@]}"
fi
# site.addsitedir also runs the main venv's .pth files (the editable install).
echo "import site; site.addsitedir('$main_site')" > "$out_site/zz-main-venv.pth"

got="$("$OUT/bin/python" -c 'import paho.mqtt; print(paho.mqtt.__version__)')"
if [ "$got" != "$PAHO_VERSION" ]; then
  echo "paho1-venv: expected paho-mqtt $PAHO_VERSION in $OUT, got $got" >&2
  exit 1
fi
"$OUT/bin/python" -c 'import soundwatch, pytest, jsonschema' >/dev/null
# The SDK imports all of its dependencies when the package is imported.
"$OUT/bin/python" -c 'from azure.iot.device import IoTHubModuleClient, Message, MethodResponse' \
  >/dev/null
if "$MAIN/bin/python" -c 'import azure.iot.device' 2>/dev/null; then
  echo "paho1-venv: note: azure-iot-device is importable from the main venv $MAIN" >&2
fi
echo "$main_site $PAHO_VERSION $AZURE_VERSION" > "$MARK"
echo "paho1-venv: $OUT ready (paho-mqtt $got, azure-iot-device $AZURE_VERSION${missing[*]:+ + ${missing[*]}}, other packages from $MAIN)" >&2
