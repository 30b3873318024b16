"""Drives containerd's CRI plugin as a kubelet would for one pod: a sandbox
through a runtime handler, one app container of another image, an exec,
then stop and remove. Prints one JSON object with what it saw."""
import json
import os
import sys
import time

import grpc

# The stubs are generated from cri_subset.proto into $CRI_STUBS.
sys.path.insert(0, os.environ["CRI_STUBS"])
import cri_subset_pb2 as pb  # noqa: E402
import cri_subset_pb2_grpc as rpc  # noqa: E402

sock, handler, image, log_dir, cgroup_parent = sys.argv[1:6]
rt = rpc.RuntimeServiceStub(grpc.insecure_channel(f"unix://{sock}"))
LONG = 900

pod_config = pb.PodSandboxConfig(
    metadata=pb.PodSandboxMetadata(name="smoke", uid="smoke-uid-1", namespace="default"),
    hostname="smoke",
    log_directory=log_dir,
    linux=pb.LinuxPodSandboxConfig(
        cgroup_parent=cgroup_parent,
        security_context=pb.LinuxSandboxSecurityContext(
            namespace_options=pb.NamespaceOption(network=pb.NODE)
        )
    ),
)
seen = {}
pod = rt.RunPodSandbox(
    pb.RunPodSandboxRequest(config=pod_config, runtime_handler=handler), timeout=LONG
).pod_sandbox_id
seen["pod"] = pod


def start_app(name, command, **security):
    """Creates and starts an app container of `image` in the pod; returns its id."""
    cid = rt.CreateContainer(
        pb.CreateContainerRequest(
            pod_sandbox_id=pod,
            config=pb.ContainerConfig(
                metadata=pb.ContainerMetadata(name=name),
                image=pb.ImageSpec(image=image),
                command=command,
                log_path=f"{name}.log",
                linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(**security)),
            ),
            sandbox_config=pod_config,
        ),
        timeout=LONG,
    ).container_id
    rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=LONG)
    return cid


# The kubelet's default: a PID namespace of the container's own.
container = start_app(
    "app",
    ["sh", "-c", "echo from-cri; test -e /image-name || echo app-root; exec sleep 1000"],
    namespace_options=pb.NamespaceOption(network=pb.NODE, pid=pb.CONTAINER),
)
status = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=container), timeout=LONG).status
seen["state"] = pb.ContainerState.Name(status.state)
ex = rt.ExecSync(pb.ExecSyncRequest(container_id=container, cmd=["sh", "-c", "echo exec-ok; exit 4"], timeout=LONG), timeout=LONG)
seen["exec"] = {"stdout": ex.stdout.decode(), "exit_code": ex.exit_code}

# Pod semantics: a second app container shares the sandbox's UTS and IPC
# namespaces (hostname, SysV/POSIX IPC, /dev/shm) with the first. The
# first has a PID namespace of its own, where its workload is PID 1; the
# second shares the pod's (shareProcessNamespace), where the pause is.
VIEW = "hostname; for ns in uts ipc; do readlink /proc/self/ns/$ns; done; tr '\\0' ' ' < /proc/1/cmdline; echo"


def exec_out(cid, script):
    r = rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", script], timeout=LONG), timeout=LONG)
    return {"stdout": r.stdout.decode(), "stderr": r.stderr.decode(), "exit_code": r.exit_code}


seen["app_view"] = exec_out(container, VIEW + "; echo pod-shm > /dev/shm/obj")
second = start_app(
    "second",
    ["sleep", "1001"],
    capabilities=pb.Capability(add_capabilities=["NET_ADMIN"]),
    namespace_options=pb.NamespaceOption(network=pb.NODE, pid=pb.POD),
)
seen["second_view"] = exec_out(second, VIEW + "; cat /dev/shm/obj")
# CAP_NET_ADMIN: a bridge in the pod's network namespace, as under runc;
# without it, refused.
BRIDGE = "brctl addbr kbr0 2>&1 | grep -o 'Operation not permitted'; ip -o link show kbr0 >/dev/null 2>&1 && echo bridge-made && brctl delbr kbr0; echo done"
seen["bridge_net_admin"] = exec_out(second, BRIDGE)
seen["bridge_default"] = exec_out(container, BRIDGE)

# A locked-down container, as a restricted Kubernetes pod asks: a
# read-only root and the runtime's default seccomp profile, which denies
# unshare without CAP_SYS_ADMIN (an unfiltered container may make a user
# namespace).
PROBE = "touch /probe 2>&1 | grep -o 'Read-only file system'; unshare -U true 2>&1 && echo userns-made; echo probed"
seen["unfiltered"] = exec_out(container, PROBE)
locked = start_app(
    "locked",
    ["sleep", "1002"],
    namespace_options=pb.NamespaceOption(network=pb.NODE, pid=pb.CONTAINER),
    readonly_rootfs=True,
    seccomp_profile_path="runtime/default",
)
seen["locked"] = exec_out(locked, PROBE)
deadline = time.time() + 60
log = ""
while time.time() < deadline:
    try:
        log = open(os.path.join(log_dir, "app.log")).read()
    except FileNotFoundError:
        pass
    if "app-root" in log:
        break
    time.sleep(0.2)
seen["log"] = log
# The pod's stats: containerd reads them from the pod's host cgroup, where
# the VMM runs (in the sandbox's own cgroup beneath it); the host's figure
# for the VMM is read around the call.
def host_memory():
    for base in ("/sys/fs/cgroup/memory", "/sys/fs/cgroup"):
        for name in ("memory.usage_in_bytes", "memory.current"):
            try:
                return int(open(f"{base}{cgroup_parent}/{pod}/{name}").read())
            except (FileNotFoundError, ValueError):
                pass
    return 0


def value(v, field):
    return getattr(v, field).value if v.HasField(field) else None


before = host_memory()
stats = rt.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=pod), timeout=LONG).stats.linux
seen["pod_stats"] = {
    "host_before": before,
    "host_after": host_memory(),
    "usage_bytes": value(stats.memory, "usage_bytes"),
    "working_set_bytes": value(stats.memory, "working_set_bytes"),
    "cpu_nanos": value(stats.cpu, "usage_core_nano_seconds"),
    "containers": sorted(c.attributes.id for c in stats.containers),
    "app": container,
}
rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=LONG)
status = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=container), timeout=LONG).status
seen["state_after_stop"] = pb.ContainerState.Name(status.state)
rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=LONG)
print(json.dumps(seen))
