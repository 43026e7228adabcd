"""The only torch in the package: the network, its training, checkpoints, sampling and benchmarks.

Runs where the GPU is (a laptop's CPU, a Chameleon node); the hub kernel never imports it.
"""
