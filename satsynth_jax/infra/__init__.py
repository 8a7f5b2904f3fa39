"""Infrastructure every job leans on and none of it owns: workdir paths, atomic writes, locks, identities,
checkpoints, devices and processes, metric logs, pictures, reports and the command line's plumbing."""
