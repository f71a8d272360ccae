# Sourced by scripts/kube-apiserver.sh and scripts/clean-room.sh (not run on its own).
#
# debian_mirror [ROOT]: prints the URI of the Debian archive that the machine's apt sources
# (under ROOT, default /) use for bookworm main, and fails, naming the files it read, when there
# is none. There is deliberately no built-in fallback: a machine that reaches Debian only through
# its own mirror or proxy must not be sent elsewhere behind its back.
#
# Both formats apt reads are understood, in the order apt reads them:
#   - one-line:  /etc/apt/sources.list and sources.list.d/*.list
#                "deb [options] URI bookworm main ..."
#   - deb822:    sources.list.d/*.sources, stanzas with "Types: deb", "URIs: URI ...",
#                "Suites: bookworm ...", "Components: main ..." (and not "Enabled: no")
# Files with other names (e.g. foo.list.disabled) are ignored, as apt ignores them.
debian_mirror() {
    local root="${1:-}" suite="${DEBIAN_SUITE:-bookworm}"
    local files=() f uri
    [ -f "${root}/etc/apt/sources.list" ] && files+=("${root}/etc/apt/sources.list")
    for f in "${root}"/etc/apt/sources.list.d/*.list "${root}"/etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && files+=("$f")
    done
    for f in "${files[@]}"; do
        case "$f" in
        *.sources)
            # deb822: blank lines separate stanzas; '#' starts a comment line.
            uri="$(awk -v suite="$suite" '
                function flush() {
                    if (types ~ /(^| )deb( |$)/ && suites ~ ("(^| )" suite "/?( |$)") \
                        && comps ~ /(^| )main( |$)/ && tolower(enabled) != "no" && uris != "") {
                        split(uris, u, " "); print u[1]; found = 1; exit
                    }
                    types = suites = comps = uris = enabled = ""
                }
                /^[ \t]*#/ { next }
                /^[ \t]*$/ { flush(); next }
                {
                    key = tolower($1); sub(/:$/, "", key)
                    val = $0; sub(/^[^:]*:[ \t]*/, "", val); gsub(/[ \t]+/, " ", val)
                    if (key == "types") types = val
                    else if (key == "uris") uris = val
                    else if (key == "suites") suites = val
                    else if (key == "components") comps = val
                    else if (key == "enabled") enabled = val
                }
                END { if (!found) flush() }
            ' "$f")"
            ;;
        *)
            # one-line: drop comments and an [options] block, then: deb URI SUITE COMPONENT...
            uri="$(sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" | awk -v suite="$suite" '
                $1 == "deb" && ($3 == suite || $3 == suite "/") {
                    for (i = 4; i <= NF; i++) if ($i == "main") { print $2; exit }
                }
            ')"
            ;;
        esac
        if [ -n "$uri" ]; then
            printf '%s\n' "${uri%/}"
            return 0
        fi
    done
    {
        echo "no apt source for Debian ${suite} main found; looked in:"
        if [ "${#files[@]}" -eq 0 ]; then
            echo "  (none: ${root}/etc/apt/sources.list and ${root}/etc/apt/sources.list.d/*.list, *.sources do not exist)"
        else
            printf '  %s\n' "${files[@]}"
        fi
        echo "add one (e.g. a 'deb URI ${suite} main' line, or a deb822 stanza with URIs:, Suites: ${suite}, Components: main) and run again"
    } >&2
    return 1
}
