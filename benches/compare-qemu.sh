#!/usr/bin/env bash
# vd against qemu-img, side by side in one run (issue 10's table). Each row is timed in ROUNDS
# alternating rounds (qemu, then vd) and the medians are compared; ratio = qemu's time / vd's
# time, so above 1 means vd is faster. The page cache is warm for reads (the fixtures are read
# once before), and `sync` runs before every timed convert so neither side pays for the other's
# dirty pages.
#
# Durability: vd's convert always fdatasyncs the new image before renaming it into place.
# `qemu-img convert` defaults to cache=unsafe and never flushes, so its convert rows are
# measured twice: `-t writeback` (qemu fdatasyncs before it exits: the guarantee vd gives; the
# goal is set against this) and qemu's default (shown for reference).
#
# Usage: benches/compare-qemu.sh [ROUNDS]   (default 5)
# Environment: VD_BENCH_DIR (fixtures; default a new directory under /var/tmp, ~16 GiB free
# needed), VD_BENCH_BIG=0 skips the 4 GiB and 8 GiB fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
big=${VD_BENCH_BIG:-1}
cargo build -q --release -p vd-tool
vd=${CARGO_TARGET_DIR:-target}/release/vd-tool
if [ -n "${VD_BENCH_DIR:-}" ]; then
    tmp=$VD_BENCH_DIR
    mkdir -p "$tmp"
else
    tmp=$(mktemp -d -p /var/tmp vd-bench.XXXXXX)
    trap 'rm -rf "$tmp"' EXIT
fi

# ---------------------------------------------------------------------------------------------
# Fixtures (made once; reused when VD_BENCH_DIR already holds them)
# ---------------------------------------------------------------------------------------------
fixture() { # file, command...: runs the command when the file is missing
    local f=$1
    shift
    [ -e "$f" ] || "$@"
}
# 1 GiB of random data, raw, and as a dynamic VHDX with 32 MiB blocks made by qemu.
fixture "$tmp/rand1g.raw" sh -c "head -c 1G /dev/urandom > '$tmp/rand1g.raw'"
fixture "$tmp/full1g.vhdx" qemu-img convert -f raw -O vhdx -o block_size=32M "$tmp/rand1g.raw" "$tmp/full1g.vhdx"
# A differencing chain over it: the child rewrites a quarter of the disk, in four places; and
# the same disk as one image, for qemu (which cannot read VHDX differencing images).
fixture "$tmp/child.vhdx" sh -c "
    '$vd' create -f vhdx -b '$tmp/full1g.vhdx' '$tmp/child.vhdx' >/dev/null &&
    '$vd' io -f vhdx -c 'write -P 0x5a 0 64M' -c 'write -P 0x6b 300M 64M' \
        -c 'write -P 0x7c 600M 64M' -c 'write -P 0x8d 960M 64M' '$tmp/child.vhdx' >/dev/null"
fixture "$tmp/flat1g.vhdx" "$vd" convert -O vhdx -o block_size=32M "$tmp/child.vhdx" "$tmp/flat1g.vhdx"
# An empty 64 TiB dynamic image with 1 MiB blocks (a 513 MiB BAT).
fixture "$tmp/empty64t.vhdx" qemu-img create -q -f vhdx -o block_size=1M "$tmp/empty64t.vhdx" 64T
if [ "$big" = 1 ]; then
    # 4 GiB of random data as a dynamic VHDX (32 MiB blocks).
    fixture "$tmp/full4g.vhdx" sh -c "head -c 4G /dev/urandom > '$tmp/rand4g.raw' &&
        qemu-img convert -f raw -O vhdx -o block_size=32M '$tmp/rand4g.raw' '$tmp/full4g.vhdx' &&
        rm '$tmp/rand4g.raw'"
    # 8 GiB dynamic VHDX with 64 MiB of data in each GiB (peak memory only).
    fixture "$tmp/spread8g.vhdx" sh -c "
        qemu-img create -q -f vhdx -o block_size=32M '$tmp/spread8g.vhdx' 8G
        for g in 0 1 2 3 4 5 6 7; do
            qemu-io -f vhdx -c \"write -P 0x\$((g + 17)) \${g}G 64M\" '$tmp/spread8g.vhdx' >/dev/null
        done"
fi
cat "$tmp"/*.raw "$tmp"/*.vhdx >/dev/null 2>&1 || true

# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
now() { date +%s.%N; }
secs() { # command... -> seconds (output discarded)
    local s e
    s=$(now)
    "$@" >/dev/null 2>&1
    e=$(now)
    echo "$e - $s" | bc -l
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
results=()
report() { # path, fixture, qemu median, vd median, goal (ratio or "-")
    local ratio met
    ratio=$(echo "$3 / $4" | bc -l)
    if [ "$5" = "-" ]; then
        met="(reference)"
    elif [ "$(echo "$ratio >= $5" | bc -l)" = 1 ]; then
        met="yes"
    else
        met="NO"
    fi
    results+=("$(printf '| %s | %s | %.3f s | %.3f s | %.2f | %s | %s |' "$1" "$2" "$3" "$4" "$ratio" "$5" "$met")")
    printf '%-48s qemu %8.3fs  vd %8.3fs  ratio %6.2f  goal %s %s\n' "$1" "$3" "$4" "$ratio" "$5" "$met"
}

# bench_row path fixture goal setup qemu-args vd-args: setup is "fresh" (a new 20 GiB image per
# round) or "full1g".
bench_row() {
    local path=$1 fix=$2 goal=$3 setup=$4 qargs=$5 vargs=$6 q=() v=() iq iv
    for _ in $(seq "$rounds"); do
        if [ "$setup" = fresh ]; then
            qemu-img create -q -f vhdx -o block_size=1M "$tmp/q.vhdx" 20G
            cp --sparse=always "$tmp/q.vhdx" "$tmp/v.vhdx"
            iq=$tmp/q.vhdx iv=$tmp/v.vhdx
        else
            iq=$tmp/full1g.vhdx iv=$tmp/full1g.vhdx
        fi
        # shellcheck disable=SC2086
        q+=("$(secs qemu-img bench -f vhdx -t writeback $qargs "$iq")")
        # shellcheck disable=SC2086
        v+=("$(secs "$vd" bench -f vhdx $vargs "$iv")")
    done
    rm -f "$tmp/q.vhdx" "$tmp/v.vhdx"
    report "$path" "$fix" "$(printf '%s\n' "${q[@]}" | median)" "$(printf '%s\n' "${v[@]}" | median)" "$goal"
}

# convert_row path fixture goal qemu-cache src-format src [qemu-src]: -O from the path name.
convert_row() {
    local path=$1 fix=$2 goal=$3 cache=$4 fmt=$5 src=$6 qsrc=${7:-$6} out q=() v=() topt=()
    out=$(echo "$path" | sed -n 's/.*-O \([a-z]*\).*/\1/p')
    [ "$cache" = default ] || topt=(-t "$cache")
    for _ in $(seq "$rounds"); do
        rm -f "$tmp/q.out" "$tmp/v.out"
        sync
        q+=("$(secs qemu-img convert "${topt[@]}" -f "$fmt" -O "$out" "$qsrc" "$tmp/q.out")")
        rm -f "$tmp/q.out"
        sync
        v+=("$(secs "$vd" convert -f "$fmt" -O "$out" "$src" "$tmp/v.out")")
        rm -f "$tmp/v.out"
    done
    report "$path (qemu -t $cache)" "$fix" "$(printf '%s\n' "${q[@]}" | median)" "$(printf '%s\n' "${v[@]}" | median)" "$goal"
}

echo "vd $(git describe --always --dirty) against $(qemu-img --version | head -1), $(nproc) cores, $(date -u +%F)"
echo

bench_row "4 KiB reads (bench -c 100000 -s 4K)" "1 GiB full VHDX, 32 MiB blocks" 10 full1g \
    "-c 100000 -s 4K" "-c 100000 -s 4K"
# The floor of 4 KiB reads: the same 100000 requests as a plain read loop over the raw file.
d=() v=()
for _ in $(seq "$rounds"); do
    d+=("$(secs dd if="$tmp/rand1g.raw" of=/dev/null bs=4K count=100000)")
    v+=("$(secs "$vd" bench -f vhdx -c 100000 -s 4K "$tmp/full1g.vhdx")")
done
dm=$(printf '%s\n' "${d[@]}" | median)
vm=$(printf '%s\n' "${v[@]}" | median)
printf '%-48s dd   %8.3fs  vd %8.3fs  ratio %6.2f  (reference: a plain read loop)\n' \
    "4 KiB reads: dd bs=4K over the raw file" "$dm" "$vm" "$(echo "$dm / $vm" | bc -l)"
results+=("$(printf '| 4 KiB reads: dd bs=4K count=100000 over the raw file vs bench | 1 GiB random raw / full VHDX | %.3f s (dd) | %.3f s | %.2f | - | (reference) |' "$dm" "$vm" "$(echo "$dm / $vm" | bc -l)")")
bench_row "allocating 4 KiB writes (bench -w -S 1M)" "fresh 20 GiB VHDX, 1 MiB blocks" 40 fresh \
    "-w -c 4096 -s 4K -S 1M" "-w -c 4096 -s 4K -S 1M"

q=() v=()
for _ in $(seq "$rounds"); do
    q+=("$(secs qemu-img info -f vhdx "$tmp/empty64t.vhdx")")
    v+=("$(secs "$vd" info -f vhdx "$tmp/empty64t.vhdx")")
done
report "info" "empty 64 TiB VHDX, 1 MiB blocks" "$(printf '%s\n' "${q[@]}" | median)" "$(printf '%s\n' "${v[@]}" | median)" 100

for cache in writeback default; do
    goal=1.5
    [ "$cache" = writeback ] || goal=-
    convert_row "convert -O raw" "1 GiB full VHDX" "$goal" "$cache" vhdx "$tmp/full1g.vhdx"
    convert_row "convert -O vhdx" "1 GiB random raw" "$goal" "$cache" raw "$tmp/rand1g.raw"
    convert_row "convert -O raw, chain flattened" "1 GiB parent + child (qemu: one image)" "$goal" \
        "$cache" vhdx "$tmp/child.vhdx" "$tmp/flat1g.vhdx"
    if [ "$big" = 1 ]; then
        convert_row "convert -O raw" "4 GiB full VHDX" "$goal" "$cache" vhdx "$tmp/full4g.vhdx"
    fi
done

# What the disk allows: the same 1 GiB of raw data written by dd with O_DIRECT in 4 MiB writes
# and fdatasynced (one stream, the source in the page cache), against vd's convert -O raw.
d=() v=()
for _ in $(seq "$rounds"); do
    rm -f "$tmp/d.out" "$tmp/v.out"
    sync
    d+=("$(secs dd if="$tmp/rand1g.raw" of="$tmp/d.out" bs=4M oflag=direct conv=fdatasync)")
    rm -f "$tmp/d.out"
    sync
    v+=("$(secs "$vd" convert -f vhdx -O raw "$tmp/full1g.vhdx" "$tmp/v.out")")
    rm -f "$tmp/v.out"
done
dm=$(printf '%s\n' "${d[@]}" | median)
vm=$(printf '%s\n' "${v[@]}" | median)
printf '%-48s dd   %8.3fs  vd %8.3fs  ratio %6.2f  (reference: the disk)\n' \
    "1 GiB to disk: dd oflag=direct vs convert -O raw" "$dm" "$vm" "$(echo "$dm / $vm" | bc -l)"
results+=("$(printf '| 1 GiB written to disk: dd bs=4M oflag=direct conv=fdatasync vs convert -O raw | 1 GiB random raw / full VHDX | %.3f s (dd) | %.3f s | %.2f | - | (reference) |' "$dm" "$vm" "$(echo "$dm / $vm" | bc -l)")")

# Sequential 1 MiB reads of the whole disk against a plain read loop over the raw file (dd).
d=() v=() q=()
for _ in $(seq "$rounds"); do
    d+=("$(secs dd if="$tmp/rand1g.raw" of=/dev/null bs=1M)")
    v+=("$(secs "$vd" bench -f vhdx -c 1024 -s 1M "$tmp/full1g.vhdx")")
    q+=("$(secs qemu-img bench -f vhdx -t writeback -c 1024 -s 1M "$tmp/full1g.vhdx")")
done
dm=$(printf '%s\n' "${d[@]}" | median)
vm=$(printf '%s\n' "${v[@]}" | median)
qm=$(printf '%s\n' "${q[@]}" | median)
pct=$(echo "100 * $dm / $vm" | bc -l)
met=NO
[ "$(echo "$pct >= 80" | bc -l)" = 1 ] && met=yes
printf '%-48s dd   %8.3fs  vd %8.3fs  %5.1f %% of the raw read loop  goal 80 %% %s\n' \
    "sequential read (bench -s 1M, whole disk)" "$dm" "$vm" "$pct" "$met"
results+=("$(printf '| sequential read (bench -c 1024 -s 1M) vs dd bs=1M over the raw file | 1 GiB full VHDX | %.3f s (dd) | %.3f s | %.0f %% | 80 %% | %s |' "$dm" "$vm" "$pct" "$met")")
report "sequential read (bench -c 1024 -s 1M)" "1 GiB full VHDX" "$qm" "$vm" -

# Peak memory of convert (maximum resident set size).
echo
sources=("$tmp/full1g.vhdx")
[ "$big" = 1 ] && sources+=("$tmp/full4g.vhdx" "$tmp/spread8g.vhdx")
for src in "${sources[@]}"; do
    rm -f "$tmp/v.out"
    kb=$( { /usr/bin/time -f '%M' "$vd" convert -O raw "$src" "$tmp/v.out" >/dev/null; } 2>&1 | tail -1)
    rm -f "$tmp/v.out"
    qkb=$( { /usr/bin/time -f '%M' qemu-img convert -O raw "$src" "$tmp/v.out" >/dev/null; } 2>&1 | tail -1)
    rm -f "$tmp/v.out"
    printf 'peak RSS of convert -O raw %-16s vd %6d KiB   qemu-img %6d KiB\n' "$(basename "$src")" "$kb" "$qkb"
    results+=("$(printf '| peak RSS, convert -O raw | %s | %d KiB (qemu) | %d KiB | | | |' "$(basename "$src")" "$qkb" "$kb")")
done

echo
echo "| path | fixture | qemu | vd | ratio | goal | met |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${results[@]}"
