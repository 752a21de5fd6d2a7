"""Simulation: the protocols at scale (engine ``virtual``) or as real daemons (``processes``).

Modules: ``scenario`` (TOML scenario files), ``network`` (the in-memory network model),
``workload`` (real training behind the engines), ``virtual`` (the virtual-time engine),
``results`` (results.json / CSV / plots, shared by every engine), ``netns`` (the private test
network real daemons run in). Each engine module offers
``run(scenario, *, progress=None) -> Results``; ``p2pfl simulate --engine NAME`` imports
``p2pfl.sim.NAME`` and calls it.
"""
