#!/usr/bin/env bash
# Runs a command under a memory limit (a fresh cgroup, as root), then prints what the limit saw:
# whether the command finished, the group's peak (page cache it read included) and how often it
# hit the limit. It shows whether a job fits a smaller machine: mapped weights (the base model's,
# `model_folder.load_model_folder`) count in a process's resident peak but can be reclaimed.
#
#   sync; echo 3 > /proc/sys/vm/drop_caches   # first, so that the files the command reads count
#   bash bench/under_memory_limit.sh 4 .venv/bin/python bench/bench_sampler.py --cases paper --variants half
#
# cgroup v2 (memory.max) or v1 (memory.limit_in_bytes); without swap a job that does not fit is
# killed (exit 137).
set -uo pipefail
if [ $# -lt 2 ]; then
    echo "usage: bash bench/under_memory_limit.sh GIB COMMAND [ARGUMENTS...]" >&2
    exit 2
fi
limit=$(( $1 * 2**30 ))
shift
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    group=/sys/fs/cgroup/vcm-limit-$$
    max=memory.max peak=memory.peak
elif [ -d /sys/fs/cgroup/memory ]; then
    group=/sys/fs/cgroup/memory/vcm-limit-$$
    max=memory.limit_in_bytes peak=memory.max_usage_in_bytes
else
    echo "error: no cgroup memory controller under /sys/fs/cgroup; run on Linux with cgroups mounted" >&2
    exit 1
fi
if ! mkdir "$group" 2>/dev/null || ! echo "$limit" >"$group/$max"; then
    echo "error: cannot create a memory cgroup in ${group%/*} (needs root); run as root" >&2
    rmdir "$group" 2>/dev/null
    exit 1
fi
bash -c 'echo $$ >"$1/cgroup.procs" && shift && exec "$@"' limit "$group" "$@"
status=$?
if [ -f "$group/memory.failcnt" ]; then
    hits="hit the limit $(cat "$group/memory.failcnt") times"
else
    hits="$(grep -E '^(max|oom_kill) ' "$group/memory.events" | tr '\n' ' ')"
fi
echo "under $(( limit / 2**30 )) GiB: exit $status, group peak $(awk '{printf "%.2f", $1 / 2^30}' "$group/$peak") GiB, $hits"
rmdir "$group" 2>/dev/null
exit $status
