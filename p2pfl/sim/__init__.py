"""Simulation: the private test network and the multi-process / virtual-time engines."""
