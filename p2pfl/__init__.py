"""p2pfl: peer-to-peer decentralized learning daemon for edge nodes."""

__version__ = "0.1.0"
