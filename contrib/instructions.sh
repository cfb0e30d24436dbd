#!/bin/sh
# Instructions per message, smsflow against the bare handler: the load
# generator's run under callgrind (valgrind), counting only what the
# servers' async workers execute (`--toggle-collect` on tokio's task
# runner), so the background threads' timed work (sled's flusher, the
# store's threads) does not blur it. The count is the same from run to
# run within a fraction of a percent, where CPU time on a shared VM moves
# by tens of percent: it is the figure to compare two builds' user-space
# work by. It leaves out the kernel (socket reads and writes, context
# switches, fsyncs), which CPU time includes; see README "Performance".
#
# Each server is measured at two request counts and the difference is
# divided by the difference of the counts, so start-up and warm-up cancel
# out. Under valgrind the code runs about 50 times slower and SHA-1 and
# SHA-256 take their portable code path (no SHA extensions), so the
# signature check and the log's phone-number hash count for more than on
# the machine.
#
# Usage: contrib/instructions.sh [SCENARIO [DURABILITY [SMSFLOW_BIN]]]
#   defaults: multistep relaxed target/release/smsflow
# Needs valgrind (Debian: apt-get install valgrind) and the release build
# (`cargo build --release --examples --bins`).
set -eu
scenario=${1:-multistep}
durability=${2:-relaxed}
bin=${3:-target/release/smsflow}
loadgen=$(dirname "$bin")/examples/loadgen
[ -x "$loadgen" ] || loadgen=target/release/examples/loadgen
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
small=2000
large=10000
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for n in $small $large; do
    mkdir "$work/$n"
    valgrind --tool=callgrind --trace-children=yes \
        --toggle-collect='*multi_thread::worker::Context::run_task*' \
        --log-file="$work/$n/log.%p" --callgrind-out-file="$work/$n/out.%p" \
        "$loadgen" --scenario "$scenario" --durability "$durability" \
        --senders 1000 --requests $n --concurrency 8 --server-bin "$bin" \
        >"$work/$n/loadgen.txt" 2>&1 || { cat "$work/$n/loadgen.txt" >&2; exit 1; }
done

# The instructions counted in the server whose command line has $1.
count() {
    file=$(grep -l -e "^cmd: .*$2" "$work/$1"/out.* | head -n 1)
    [ -n "$file" ] || { echo "no callgrind output for $2" >&2; exit 1; }
    sed -n 's/^summary: //p' "$file"
}

per_message() {
    a=$(count $small "$1")
    b=$(count $large "$1")
    echo $(( (b - a) / (large - small) ))
}

bare=$(per_message "--bare-server")
ours=$(per_message " serve ")
echo "scenario $scenario | durability $durability | instructions per message in the async workers (callgrind, $large - $small requests)"
echo "bare handler  $bare"
echo "smsflow       $ours"
awk -v o="$ours" -v b="$bare" 'BEGIN { printf "ratio         %.2fx\n", o / b }'
