"""Chameleon leases and nodes, SSH, and the runners that run `nanorepro` commands here or there. Torch-free."""
