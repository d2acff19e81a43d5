#!/usr/bin/env bash
# A private CA and the SuperLink's TLS server certificate, in DIR (default: this folder).
#
#   ca.crt          the CA certificate: give it to every hospital (public)
#   ca.key          the CA's private key: keep it on the server side only
#   server.crt/.key the SuperLink's certificate and key (mounted into the SuperLink only)
#   superexec.secret shared secret of the SuperLink and its server-side executor (server only)
#
# Idempotent: nothing is regenerated while server.crt, server.key and ca.crt exist (delete them
# to rotate). Subject alternative names: localhost, 127.0.0.1, ::1, the compose service name
# `superlink`, plus any extra names in $SUPERLINK_SANS (comma separated, e.g.
# "DNS:fl.hospital-net.example,IP:10.1.2.3") - the address hospitals dial must be one of them.
#
# Usage: deploy/tls/make-certs.sh [DIR]     (env: SUPERLINK_SANS, CERT_DAYS=825)
set -euo pipefail
DIR=${1:-$(dirname "$0")}
DAYS=${CERT_DAYS:-825}
mkdir -p "$DIR"
cd "$DIR"

umask 077
if [[ ! -s superexec.secret ]]; then
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >superexec.secret
fi
if [[ -s server.crt && -s server.key && -s ca.crt ]]; then
    echo "make-certs: $PWD already has ca.crt, server.crt, server.key (delete them to renew)"
    exit 0
fi
command -v openssl >/dev/null || {
    echo "make-certs: openssl is required" >&2
    exit 1
}

SANS="DNS:localhost,IP:127.0.0.1,IP:::1,DNS:superlink"
[[ -n ${SUPERLINK_SANS:-} ]] && SANS="$SANS,$SUPERLINK_SANS"

if [[ ! -s ca.key || ! -s ca.crt ]]; then
    openssl req -x509 -newkey rsa:4096 -sha256 -nodes -days "$DAYS" \
        -keyout ca.key -out ca.crt -subj "/CN=fedunroll federation CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
openssl req -newkey rsa:4096 -sha256 -nodes -keyout server.key -out server.csr \
    -subj "/CN=superlink" 2>/dev/null
cat >server.ext <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$SANS
EOF
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -out server.crt -days "$DAYS" -sha256 -extfile server.ext 2>/dev/null
rm -f server.csr server.ext ca.srl
# The certificate files are public; the keys stay readable by their owner only. Containers run
# as root by default, so 0600 is enough for them too.
chmod 644 ca.crt server.crt
chmod 600 ca.key server.key
echo "make-certs: wrote $PWD/{ca.crt,ca.key,server.crt,server.key} (SANs: $SANS)"
