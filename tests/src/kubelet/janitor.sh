# The kubelet cluster's janitor (tests/src/kubelet/mod.rs runs it with bash -c): it waits for
# EOF on stdin, a pipe from the test process, and if the node's directory is still there then,
# the test process died without dropping the cluster (a kill, Ctrl-C), so it undoes what the node
# did, as KubeletCluster's Drop would. Drop removes the directory, so after Drop this does nothing.
# Arguments: TOP (the cluster's directory) NODE_DIR CONTAINERD_SOCKET BRIDGE CGROUP_ROOT.
top="$1" dir="$2" socket="$3" bridge="$4" cgroup="$5"
# Ctrl-C reaches the whole process group: the janitor must outlive it (ignored signals stay
# ignored in cat too).
trap '' INT TERM HUP
cat >/dev/null
[ -d "${top}" ] || exit 0
# The guardians are stopping the kubelet and containerd.
sleep 2
cgroup_dirs() {
    # (The file system type is the field after "-"; optional fields come before it.)
    awk '{ for (i = 7; i < NF; i++) if ($i == "-") { if ($(i + 1) ~ /^cgroup2?$/) print $5; break } }' \
        /proc/self/mountinfo \
        | while read -r mount; do [ -d "${mount}${cgroup}" ] && echo "${mount}${cgroup}"; done
}
# The pods' processes, then the shims serving this node's containerd.
for _ in 1 2 3 4 5; do
    pids="$(cgroup_dirs | while read -r d; do find "$d" -name cgroup.procs -exec cat {} +; done | sort -u)"
    [ -z "${pids}" ] && break
    # shellcheck disable=SC2086
    kill -KILL ${pids} 2>/dev/null
    sleep 0.5
done
# (Each shim serves one pod's containers, at a socket named after containerd's address, the
# namespace and the pod sandbox's ID; killed, it leaves the socket file.)
for task in "${dir}/containerd/state/io.containerd.runtime.v2.task/k8s.io"/*; do
    [ -d "${task}" ] || continue
    hash="$(printf '%s' "${socket}/k8s.io/${task##*/}" | sha256sum)"
    rm -f "/run/containerd/s/${hash%% *}"
done
for p in /proc/[0-9]*; do
    cmd="$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null)"
    case "${cmd}" in
    *containerd-shim-runc-v2*" -address ${socket} "*) kill -KILL "${p#/proc/}" 2>/dev/null ;;
    esac
done
sleep 0.5
# Mounts under the cluster's directory, newest first.
awk -v top="${top}/" 'index($5, top) == 1 { print $5 }' /proc/self/mountinfo | tac \
    | while read -r m; do umount -l "$m"; done
ip link del "${bridge}" 2>/dev/null
cgroup_dirs | while read -r d; do find "$d" -depth -type d -exec rmdir {} + 2>/dev/null; done
# The kernel settings the kubelet changed ("PATH VALUE" lines, saved before it started).
while read -r path value; do
    echo "${value}" >"${path}"
done <"${dir}/sysctls"
# This node's pods' logs and CNI results.
for pod in "${dir}/kubelet/pods"/*; do
    for d in /var/log/pods/*_"${pod##*/}"; do
        [ -d "$d" ] || continue
        find /var/log/containers -lname "$d/*" -delete 2>/dev/null
        rm -rf "$d"
    done
done
rm -f /var/lib/cni/results/"${bridge}"-*
for sandbox in "${dir}/containerd/root/io.containerd.grpc.v1.cri/sandboxes"/*; do
    rm -f /var/lib/cni/results/*-"${sandbox##*/}"-*
done
# The fixed directories the node made (one a line, parents first): the kubelet's device-plugin
# socket, then each directory if empty.
if grep -qx /var/lib/kubelet/device-plugins "${dir}/made-dirs"; then
    rm -f /var/lib/kubelet/device-plugins/{kubelet.sock,DEPRECATION,kubelet_internal_checkpoint}
fi
tac "${dir}/made-dirs" | while read -r d; do rmdir "$d" 2>/dev/null; done
if awk -v top="${top}/" 'index($5, top) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
    echo "kubelet cluster janitor: still mounted under ${top}; left in place" >&2
else
    rm -rf "${top}"
fi
