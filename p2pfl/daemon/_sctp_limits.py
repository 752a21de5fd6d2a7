"""Limits of the tuned SCTP association that the link settings need without importing aiortc.

``p2pfl.daemon.datachannel`` (imported before any link exists, so without aiortc) and
``p2pfl.daemon.sctp`` (aiortc's SCTP, loaded on the first link) both read these; neither imports
the other for them.
"""

SACK_EVERY = 4
"""Data packets per SCTP SACK, at most (aiortc: 1; RFC 9260 6.2 asks for >= every 2nd)."""
