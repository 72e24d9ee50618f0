#!/usr/bin/env bash
# Runs `qemu-img bench` and `vd-tool bench` on the same VHDX images in one run and prints the
# time ratio vd/qemu for each case (below 1: vd is faster). Both go through the page cache
# (qemu with -t writeback) and both flush at the end of write runs. Needs qemu-img and qemu-io.
# Usage: benches/compare-qemu.sh [ROUNDS]   (default 3; the median of the rounds is reported)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
cargo build -q --release -p vd-tool
vd=target/release/vd-tool
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# A 1 GiB dynamic image (1 MiB blocks) full of data, made by qemu.
qemu-img create -q -f vhdx -o block_size=1M "$tmp/full.vhdx" 1G
qemu-io -f vhdx -c 'write -P 0x5a 0 1G' "$tmp/full.vhdx" >/dev/null

secs() { # command... -> seconds
    local s e
    s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N)
    echo "$e - $s" | bc -l
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

case_run() { # name, fresh(0/1), qemu-args, vd-args
    local name=$1 fresh=$2 qargs=$3 vargs=$4 q=() v=()
    for _ in $(seq "$rounds"); do
        if [ "$fresh" = 1 ]; then
            qemu-img create -q -f vhdx -o block_size=1M "$tmp/q.vhdx" 4G
            cp --sparse=always "$tmp/q.vhdx" "$tmp/v.vhdx"
            img_q=$tmp/q.vhdx img_v=$tmp/v.vhdx
        else
            img_q=$tmp/full.vhdx img_v=$tmp/full.vhdx
        fi
        # shellcheck disable=SC2086
        q+=("$(secs qemu-img bench -f vhdx -t writeback $qargs "$img_q")")
        # shellcheck disable=SC2086
        v+=("$(secs "$vd" bench -f vhdx $vargs "$img_v")")
    done
    local qm vm
    qm=$(printf '%s\n' "${q[@]}" | median)
    vm=$(printf '%s\n' "${v[@]}" | median)
    printf '%-44s qemu %8.3fs  vd %8.3fs  ratio %.2f\n' "$name" "$qm" "$vm" "$(echo "$vm / $qm" | bc -l)"
}

case_run "read 4K x 100000, sequential"    0 "-c 100000 -s 4K"        "-c 100000 -s 4K"
case_run "read 1M x 2000, sequential"      0 "-c 2000 -s 1M"          "-c 2000 -s 1M"
case_run "write 64K x 16384, allocating"   1 "-w -c 16384 -s 64K"     "-w -c 16384 -s 64K"
case_run "write 4K x 1000, step 1M (alloc)" 1 "-w -c 1000 -s 4K -S 1M" "-w -c 1000 -s 4K -S 1M"
