//! virtio-vsock with a Firecracker-compatible Unix-socket host side.
