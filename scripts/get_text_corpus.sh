#!/usr/bin/env bash
# Write the King James Bible (public domain) as plain English text for continued pretraining:
#
#   data/kjv.txt    one verse per line, 31,102 lines, text only (no "Ge1:1" references)
#   data/kjv.jsonl  one {"text": ...} row per chapter (1,189 rows, verses joined by newlines):
#                   the shape `llamaforge train configs/pt_plain_text.yaml` reads
#
# Source: Debian's `bible-kjv` (the `bible` program) and `bible-kjv-text` (its compressed
# text data, /usr/lib/bible.data). Both .debs are fetched with `apt-get download` into a temp
# dir and unpacked with `dpkg-deb -x` into a temp root; nothing is installed into the system.
# The extracted program dumps every verse:
#   bible -f -p <root>/usr/lib Gen1:1-Rev22:21
# (`-f` turns pretty-printing off: one "Ref text" line per verse; `-p` is the data search
# path, see bible(1)).
#
# Usage: scripts/get_text_corpus.sh [OUT_DIR]     (default: <repo>/data)
#        FORCE=1 scripts/get_text_corpus.sh       rebuild even if the outputs are complete
set -euo pipefail

VERSES=31102
CHAPTERS=1189
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-$ROOT/data}"
TXT="$OUT_DIR/kjv.txt"
JSONL="$OUT_DIR/kjv.jsonl"

count_lines() { if [[ -f "$1" ]]; then wc -l <"$1" | tr -d ' '; else echo 0; fi; }

if [[ "${FORCE:-0}" != 1 && "$(count_lines "$TXT")" == "$VERSES" &&
    "$(count_lines "$JSONL")" == "$CHAPTERS" ]]; then
    echo "$TXT ($VERSES verses) and $JSONL ($CHAPTERS chapters) already exist (FORCE=1 rebuilds)"
    exit 0
fi

for tool in apt-get dpkg-deb; do
    command -v "$tool" >/dev/null || {
        echo "error: $tool not found (this script needs a Debian/Ubuntu system)" >&2
        exit 1
    }
done

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

fetch_debs() { (cd "$WORK" && apt-get download "$@"); }

download() {
    # $@: package names. Retry once after refreshing the package lists.
    if ! fetch_debs "$@"; then
        echo "apt-get download failed; running apt-get update and retrying" >&2
        if [[ "$(id -u)" == 0 ]]; then apt-get update; else sudo apt-get update; fi
        fetch_debs "$@"
    fi
}

download bible-kjv bible-kjv-text
mkdir -p "$WORK/root"
for deb in "$WORK"/*.deb; do dpkg-deb -x "$deb" "$WORK/root"; done

BIBLE="$WORK/root/usr/bin/bible"
DATA_DIR="$WORK/root/usr/lib"
[[ -x "$BIBLE" && -f "$DATA_DIR/bible.data" ]] || {
    echo "error: the packages did not contain usr/bin/bible and usr/lib/bible.data" >&2
    exit 1
}

# The program links against libreadline8; where that library is missing, unpack it (and
# libtinfo6, its dependency) beside the program instead of installing it.
if ldd "$BIBLE" | grep -q "not found"; then
    download libreadline8 libtinfo6
    for deb in "$WORK"/libreadline8_*.deb "$WORK"/libtinfo6_*.deb; do
        dpkg-deb -x "$deb" "$WORK/root"
    done
    export LD_LIBRARY_PATH="$WORK/root/lib/x86_64-linux-gnu:$WORK/root/usr/lib/x86_64-linux-gnu:$WORK/root/lib:$WORK/root/usr/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

RAW="$WORK/kjv.raw"
"$BIBLE" -f -p "$DATA_DIR" Gen1:1-Rev22:21 </dev/null >"$RAW"

# Each line is "<Book><chapter>:<verse> <text>", e.g. "1Sm3:10 And the LORD came, ...".
PATTERN='^[1-3]?[A-Za-z]+[0-9]+:[0-9]+ [^ ]'
got="$(count_lines "$RAW")"
bad="$(grep -cvE "$PATTERN" "$RAW" || true)"
if [[ "$got" != "$VERSES" || "$bad" != 0 ]]; then
    echo "error: bible printed $got lines ($bad not 'Ref text'); expected $VERSES verses" >&2
    exit 1
fi

mkdir -p "$OUT_DIR"
# Plain text: drop the reference, squeeze repeated spaces.
sed -E 's/^[^ ]+ //; s/ +/ /g; s/ +$//' "$RAW" >"$WORK/kjv.txt"
# One JSON row per chapter. The text is ASCII without quotes or backslashes needing more than
# the escapes below, but escape them anyway.
awk '
    function esc(s) { gsub(/\\/, "\\\\", s); gsub(/"/, "\\\"", s); gsub(/\t/, "\\t", s); return s }
    {
        ref = $1
        sub(/:[0-9]+$/, "", ref)           # "Ge1:3" -> "Ge1": book + chapter
        text = $0
        sub(/^[^ ]+ /, "", text)
        gsub(/ +/, " ", text); sub(/ +$/, "", text)
        if (ref != chapter && NR > 1) { printf "{\"text\": \"%s\"}\n", body }
        body = (ref == chapter) ? body "\\n" esc(text) : esc(text)
        chapter = ref
    }
    END { if (NR) printf "{\"text\": \"%s\"}\n", body }
' "$RAW" >"$WORK/kjv.jsonl"

rows="$(count_lines "$WORK/kjv.jsonl")"
if [[ "$rows" != "$CHAPTERS" ]]; then
    echo "error: grouped $rows chapters, expected $CHAPTERS" >&2
    exit 1
fi
mv -f "$WORK/kjv.txt" "$TXT"
mv -f "$WORK/kjv.jsonl" "$JSONL"
echo "wrote $TXT ($VERSES verses, $(wc -c <"$TXT" | tr -d ' ') bytes) and $JSONL ($CHAPTERS chapters)"
