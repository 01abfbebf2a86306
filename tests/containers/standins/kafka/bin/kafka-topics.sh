#!/bin/sh
exec python3 /opt/kafka/libexec/cli.py kafka-topics.sh "$@"
