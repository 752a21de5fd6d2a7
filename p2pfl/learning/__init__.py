"""The learning layer: from a setup description to a running learner, for daemon and engines.

It sits between the learning core and the protocol machines (``p2pfl.ml``, ``p2pfl.protocols``)
below and the daemon and the simulator (``p2pfl.daemon``, ``p2pfl.sim``) above, and imports
neither of those above. Modules: ``ops`` (model operations and workloads over the core's tasks;
imports torch), ``factory`` (a setup description -> a learner) and ``neighbours`` (which peers a
server-free node exchanges with); the last two import no torch, so configuration loaders can use
them.
"""
