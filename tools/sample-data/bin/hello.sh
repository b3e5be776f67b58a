#!/bin/sh
echo "hello from a script on a fusefs mount"
