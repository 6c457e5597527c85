#!/bin/sh
# Make the cluster key that peers authenticate each other with, then copy the
# same file to every host of the cluster (scp -p, or your configuration tool).
# Disk images hold tenants' data: the key is root's alone (mode 0600), made so
# before a byte of it is written.
set -eu
key=${1:-/etc/fusecache/cluster.key}
if [ -e "$key" ]; then
    echo "cluster-key.sh: $key exists: remove it first to make a new key (every host needs the new one)" >&2
    exit 1
fi
install -d -m 0700 "$(dirname "$key")"
install -m 0600 /dev/null "$key"
head -c 32 /dev/urandom > "$key"
echo "made $key; copy it to every host: scp -p $key host2:$key" >&2
