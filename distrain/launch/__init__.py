"""Starting workers: `distrain launch` over torch's elastic launcher, and the ports a rendezvous needs."""
