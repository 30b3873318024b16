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

sock, handler, image, log_dir = sys.argv[1:5]
rt = rpc.RuntimeServiceStub(grpc.insecure_channel(f"unix://{sock}"))
LONG = 900

pod_config = pb.PodSandboxConfig(
    metadata=pb.PodSandboxMetadata(name="smoke", uid="smoke-uid-1", namespace="default"),
    hostname="smoke",
    log_directory=log_dir,
    linux=pb.LinuxPodSandboxConfig(
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
container = rt.CreateContainer(
    pb.CreateContainerRequest(
        pod_sandbox_id=pod,
        config=pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name="app"),
            image=pb.ImageSpec(image=image),
            command=["sh", "-c", "echo from-cri; test -e /image-name || echo app-root; exec sleep 1000"],
            log_path="app.log",
        ),
        sandbox_config=pod_config,
    ),
    timeout=LONG,
).container_id
rt.StartContainer(pb.StartContainerRequest(container_id=container), timeout=LONG)
status = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=container), timeout=LONG).status
seen["state"] = pb.ContainerState.Name(status.state)
ex = rt.ExecSync(pb.ExecSyncRequest(container_id=container, cmd=["sh", "-c", "echo exec-ok; exit 4"], timeout=LONG), timeout=LONG)
seen["exec"] = {"stdout": ex.stdout.decode(), "exit_code": ex.exit_code}
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
rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=LONG)
status = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=container), timeout=LONG).status
seen["state_after_stop"] = pb.ContainerState.Name(status.state)
rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=LONG)
print(json.dumps(seen))
