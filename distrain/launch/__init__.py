"""Starting workers: `distrain launch` over torch's elastic launcher, and Kubernetes manifests (the ports a
rendezvous needs are distrain/ports.py, which the process group's error messages use too)."""
