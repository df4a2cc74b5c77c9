"""distrain inside other engines' workers: each module reuses the process group and device the engine creates."""
